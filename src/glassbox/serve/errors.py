"""Errors answered as OpenAI-style bodies: {"error": {"message", "type", "param", "code"}}.

A 4xx is raised where the bad value is found, as :class:`APIError` with the parameter's
name (``param``) known at that point. Anything unexpected is a 500 whose body carries a
generic message and the request id; the detail (traceback, paths, memory figures) goes
to the server log under the same id, never to the client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glassbox.errors import GlassboxError
from glassbox.infer.engine import QueueFullError

log = logging.getLogger("glassbox.serve")

REQUEST_ID_HEADER = "x-request-id"


class APIError(Exception):
    """An error answered as an OpenAI-style body with HTTP status ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code,
        )  # fmt: skip

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self, request_id: str | None = None) -> JSONResponse:
        headers = {REQUEST_ID_HEADER: request_id} if request_id else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None, code: str | None = None) -> APIError:
    """A 400 naming the parameter."""
    return APIError(400, message, "invalid_request_error", param, code)


def from_glassbox(e: GlassboxError, param: str | None = None) -> APIError:
    """A user error from the engine layer, answered 400 (429 for a full queue)."""
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), "rate_limit_error", None, "queue_full")
    return bad_request(str(e), param)


def internal_error(request_id: str) -> APIError:
    """What a client sees for a server fault: no internals, an id to quote."""
    return APIError(
        500,
        f"The server had an error while processing the request (request id {request_id}). "
        "Retry, or report the request id to the operator; the details are in the server log.",
        "server_error",
        None,
        "internal_error",
    )


def request_id_of(request: Request) -> str:
    """The id the guard middleware gave this request (see serve/guard.py)."""
    return getattr(request.state, "request_id", None) or "unknown"


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception the app can raise to an OpenAI-style body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(GlassboxError)
    async def _glassbox_error(request: Request, e: GlassboxError):
        return from_glassbox(e).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "invalid JSON")
            return bad_request(f"The request body is not valid JSON: {detail}.", None).response()
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problems)"
        return bad_request(msg, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        detail = str(e.detail)
        if e.status_code == 400 and "parsing the body" in detail:
            detail = "The request body could not be parsed; send UTF-8 JSON."
        return APIError(e.status_code, detail, "invalid_request_error", None, code).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        rid = request_id_of(request)
        log.error("request %s failed", rid, exc_info=e)
        return internal_error(rid).response(rid)
