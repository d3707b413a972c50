"""Every error leaves the server in OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`, with the status the official client maps to its exception classes: 400
BadRequestError, 404 NotFoundError, 429 RateLimitError, 500 InternalServerError, 503 (the
client retries it unless max_retries=0)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tp_engine.errors import (
    EngineError,
    EngineTerminatedError,
    InvalidRequestError,
    WorkerDiedError,
)

log = logging.getLogger("tp_engine.serve")


class APIError(Exception):
    """An error the server decides on itself (starting, draining, full, unknown model)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code


def unavailable(message: str) -> APIError:
    return APIError(503, message, "service_unavailable", code="service_unavailable")


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_exception(error: BaseException, fields: set[str] | None = None) -> APIError:
    """The HTTP status and body for an engine error. `fields` are the request's field names:
    SamplingParams' messages start with the field at fault, which becomes `param`."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, InvalidRequestError):
        word = str(error).split(" ", 1)[0]
        return APIError(400, str(error), param=word if word in (fields or ()) else None)
    if isinstance(error, WorkerDiedError):  # the message names the rank and how it died
        return APIError(500, f"engine failed: {error}", "server_error", code="worker_died")
    if isinstance(error, EngineTerminatedError):
        return unavailable(f"the engine is shutting down: {error}")
    if isinstance(error, EngineError):
        return APIError(500, f"engine failed: {error}", "server_error")
    log.exception("unexpected error", exc_info=error)
    return APIError(500, f"internal error: {type(error).__name__}", "server_error")


def to_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.type, error.param, error.code),
                        status_code=error.status)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        return to_response(APIError(400, f"{param}: {message}" if param else message,
                                    param=param))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return to_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(APIError)
    @app.exception_handler(EngineError)
    async def _ours(request: Request, exc: Exception) -> JSONResponse:
        return to_response(from_exception(exc))

    @app.exception_handler(Exception)  # a bug: still OpenAI's shape (Starlette logs it)
    async def _other(request: Request, exc: Exception) -> JSONResponse:
        return to_response(from_exception(exc))
