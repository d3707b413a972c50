"""The routes: OpenAI's completions, chat completions and models, plus /health and /metrics."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from tp_engine.serve.errors import error_body, install_handlers
from tp_engine.serve.jobs import new_job
from tp_engine.serve.metrics import CONTENT_TYPE
from tp_engine.serve.protocol import ChatCompletionRequest, CompletionRequest
from tp_engine.serve.responses import ClientGone, SSEResponse, sse_events, unless_disconnected
from tp_engine.serve.state import ServerState


def create_app(server: ServerState) -> FastAPI:
    app = FastAPI(title="tp-engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    install_handlers(app)
    created = int(time.time())

    async def generate(body: ChatCompletionRequest | CompletionRequest,
                       raw: Request) -> Response:
        job = await new_job(server, body, time.perf_counter())  # raises what the client sees
        if body.stream:
            return SSEResponse(sse_events(job))
        try:
            return JSONResponse(await unless_disconnected(job.result(), raw.receive))
        except ClientGone:  # the request is aborted already; the status goes nowhere
            return Response(status_code=499)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await generate(body, raw)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await generate(body, raw)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": server.served_name, "object": "model", "created": created,
                "owned_by": "tp-engine", "root": server.served_name}
        if server.engine is not None:
            card["max_model_len"] = server.engine.config.max_model_len
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        status = server.health
        if status == "serving":
            return JSONResponse({"status": status})
        body = error_body(f"the server is {status}", "service_unavailable",
                          code="service_unavailable")
        return JSONResponse({"status": status, **body}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    return app
