"""`tp-engine serve`: start the HTTP server at once (so /health can say "starting"), build the
engine beside it, and shut down in our order on SIGTERM or SIGINT:

1. stop admitting: new requests and /health get 503;
2. let in-flight requests finish, up to --drain-timeout (a second signal cuts this short);
3. abort the rest (streams end with finish_reason "abort");
4. stop uvicorn (it closes the listening socket and waits for the responses to end);
5. engine.terminate(), which reaps every worker; exit 0.

uvicorn would install its own handlers and stop at once, so they are switched off."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import prometheus_client
import uvicorn

from tp_engine.engine.api import AsyncEngine
from tp_engine.serve.app import create_app
from tp_engine.serve.state import ServerState

log = logging.getLogger("tp_engine.serve")


@dataclass
class ServeOptions:
    served_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    drain_timeout: float = 30.0
    max_waiting: int | None = None
    log_level: str = "info"
    access_log: bool = True


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # signals are ours (see _Signals): the drain must come before uvicorn stops


class _Signals:
    def __init__(self) -> None:
        self.count = 0
        self.first, self.second = asyncio.Event(), asyncio.Event()

    def __call__(self, sig: signal.Signals) -> None:
        self.count += 1
        log.info("%s: %s", sig.name, "draining" if self.count == 1 else "skipping the drain")
        (self.first if self.count == 1 else self.second).set()


class EngineHost:
    """Builds the engine, holds it and terminates it on one thread of its own. The kernel's
    parent-death signal of spawned workers is tied to the thread that started them, so that
    thread must live as long as they do (a pool thread from asyncio.to_thread need not)."""

    def __init__(self, kwargs: dict[str, Any],
                 on_ready: Callable[[AsyncEngine | None, BaseException | None], None]):
        self._kwargs, self._on_ready = kwargs, on_ready
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tp-engine-serve-engine",
                                       daemon=True)

    def _run(self) -> None:
        try:
            engine = AsyncEngine(**self._kwargs)
        except BaseException as e:  # reported to the loop, which exits 1
            self._on_ready(None, e)
            return
        self._on_ready(engine, None)
        self._stop.wait()
        engine.terminate()

    def stop(self, timeout: float) -> bool:
        self._stop.set()
        self.thread.join(timeout)
        return not self.thread.is_alive()


async def _drain(state: ServerState, signals: _Signals, timeout: float) -> None:
    state.phase = "draining"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    if state.jobs:
        log.info("draining %d requests (up to %.0f s)", len(state.jobs), timeout)
    while state.jobs and not signals.second.is_set() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if state.jobs:
        log.warning("aborting %d requests still in flight", len(state.jobs))
        for job in list(state.jobs):
            job.abort()
        # their last chunks are on the way: give the responses a moment to end cleanly
        end = loop.time() + 5.0
        while state.jobs and loop.time() < end:
            await asyncio.sleep(0.02)


async def _http(server: uvicorn.Server) -> None:
    with contextlib.suppress(SystemExit):  # uvicorn exits this way when it cannot bind
        await server.serve()


async def serve(options: ServeOptions, engine_kwargs: dict[str, Any]) -> int:
    loop = asyncio.get_running_loop()
    state = ServerState(options.served_name, options.max_waiting)
    signals = _Signals()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals, sig)
    host = EngineHost(engine_kwargs,
                      lambda e, err: loop.call_soon_threadsafe(state.engine_ready, e, err))
    config = uvicorn.Config(create_app(state), host=options.host, port=options.port,
                            lifespan="off", log_level=options.log_level,
                            access_log=options.access_log, timeout_graceful_shutdown=5)
    server = _Server(config)
    http = asyncio.ensure_future(_http(server))
    host.thread.start()
    failed = asyncio.ensure_future(_failed_to_start(state))
    stop = asyncio.ensure_future(signals.first.wait())
    code = 0
    try:
        await asyncio.wait({http, failed, stop}, return_when=asyncio.FIRST_COMPLETED)
        if http.done() or failed.done():
            code = 1  # could not bind, or the engine could not start: nothing to serve
        else:
            await _drain(state, signals, options.drain_timeout)
        if state.phase != "failed":
            state.phase = "stopped"
        server.should_exit = True
        await http
    finally:
        for task in (failed, stop):
            task.cancel()
        start = time.perf_counter()
        # the engine's own terminate_timeout bounds this; the margin covers a slow startup
        if not await asyncio.to_thread(host.stop, 30.0):
            log.error("the engine did not stop in time")
            code = code or 1
        log.info("engine terminated in %.0f ms", (time.perf_counter() - start) * 1e3)
    return code


async def _failed_to_start(state: ServerState) -> None:
    await state.engine_settled.wait()
    if state.start_error is None:
        await asyncio.Event().wait()  # started: never done


def run(options: ServeOptions, engine_kwargs: dict[str, Any]) -> int:
    logging.basicConfig(level=options.log_level.upper(),
                        format="%(levelname)s:     %(name)s: %(message)s")
    prometheus_client.disable_created_metrics()  # no `_created` series beside each counter
    return asyncio.run(serve(options, engine_kwargs))
