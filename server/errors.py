"""Every failure as OpenAI's error envelope: {"error": {"message", "type", "param", "code"}}."""
import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def envelope(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(envelope(error.status, error.message, error.code, error.param), error.status,
                        headers=error.headers)


def _describe(errors: list[dict]) -> tuple[str, str | None]:
    """A readable message from pydantic's errors, naming the fields; and as `param` the first field named
    (for a union, the field itself rather than the member type pydantic tried last)."""
    parts, locs = [], []
    for e in errors:
        loc = tuple(e["loc"][1:]) if e["loc"][:1] == ("body",) else tuple(e["loc"])
        if loc[:1] == ("messages",) and len(loc) > 2:  # pydantic names the role's model: messages.2.tool.tool_call_id
            loc = loc[:2] + loc[3:]
        field = ".".join(map(str, loc))
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown field {field!r}")
        elif e["type"] == "json_invalid":
            parts.append(f"the body is not valid JSON: {e.get('ctx', {}).get('error', message)}")
            loc = ()
        else:
            parts.append(f"{field}: {message}" if field else message)
        locs.append(loc)
    same_field = [loc for loc in locs if loc[:1] == locs[0][:1]] if locs else []
    param = ".".join(map(str, os.path.commonprefix(same_field))) if same_field else ""
    return "; ".join(parts), param or None


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        message, param = _describe(list(exc.errors()))
        return JSONResponse(envelope(400, message, "invalid_request", param), 400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        message, code = {400: ("the body is not valid JSON in UTF-8", "invalid_request"),  # FastAPI's body parsing
                         404: ("no such route", None),
                         405: ("method not allowed", None)}.get(exc.status_code, (str(exc.detail), None))
        return JSONResponse(envelope(exc.status_code, message, code), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(envelope(500, f"internal error: {type(exc).__name__}"), 500)
