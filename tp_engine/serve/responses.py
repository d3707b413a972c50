"""Server-sent events, and noticing a client that left. Starlette's StreamingResponse, under
ASGI 2.4, notices a disconnect only at its next write and then leaves the body generator
suspended for the garbage collector: a request still waiting for its first token would hold
its KV blocks until it finished. Here a disconnect cancels at once and the body is closed
explicitly, which aborts the request in the engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tp_engine.errors import EngineError
from tp_engine.serve.errors import error_body, from_exception
from tp_engine.serve.jobs import Job

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before the response was ready."""


async def until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(work: Awaitable[T], receive: Receive) -> T:
    """Await `work`, cancelling it if the client disconnects first (ClientGone)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientGone()
    return task.result()


def event(data: dict[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n"


async def sse_events(job: Job) -> AsyncIterator[str]:
    """`data: {chunk}` per chunk, then `data: [DONE]`. An engine error after the headers
    are sent can only travel in the stream: as OpenAI does, an `error` event (the official
    client raises it as an APIError)."""
    chunks = job.chunks()
    try:
        async for chunk in chunks:
            yield event(chunk.to_dict())
    except EngineError as e:
        error = from_exception(e)
        yield event(error_body(error.message, error.type, error.param, error.code))
    finally:
        await chunks.aclose()  # closes the engine stream even when we are closed mid-yield
    yield event("[DONE]")


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[str]):
        super().__init__(body, headers={"Cache-Control": "no-cache",
                                        "X-Accel-Buffering": "no"})
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await unless_disconnected(self.stream_response(send), receive)
        except (ClientGone, OSError):  # gone: nobody to tell
            pass
        finally:
            await self._body.aclose()  # type: ignore[attr-defined]
