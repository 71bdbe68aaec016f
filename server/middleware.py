"""The middlewares in front of the routes, outermost first: the request log (every request gets an id, echoed as
`X-Request-Id`, and every API request one log line when its answer ends), CORS (a browser's preflight is answered
before any API key is asked for, and refusals carry the headers that let the page read them), then admission
(server/admission.py)."""
import logging
import re
import time
import urllib.parse
import uuid

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from server.admission import OPEN_PATHS, Admission
from server.lifecycle import Lifecycle
from server.metrics import Metrics

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
# A client's id is written into the logs as it is, so it must be short and plain: 1 to 128 visible ASCII
# characters (no spaces, no control characters); any other value is replaced by one the server makes.
CLIENT_REQUEST_ID = re.compile(rb"[!-~]{1,128}")


def install(app: FastAPI, lifecycle: Lifecycle, metrics: Metrics) -> None:
    """Starlette runs the middleware added last first."""
    config = lifecycle.config
    app.add_middleware(Admission, lifecycle=lifecycle, metrics=metrics, max_body_bytes=config.max_body_bytes,
                       api_keys=config.api_keys)
    # The lists go to Starlette as they are, as vLLM passes them: with credentials allowed, Starlette answers an
    # allowed origin by name rather than with "*", which browsers refuse for requests that carry credentials.
    app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=config.allowed_methods,
                       allow_headers=config.allowed_headers, allow_credentials=config.allow_credentials,
                       expose_headers=[REQUEST_ID_HEADER])
    app.add_middleware(RequestLog)


def request_id(scope) -> str:
    """The client's `X-Request-Id` when it is fit for the logs, else a new one."""
    given = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode())
    return given.decode() if given is not None and CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestLog:
    """Sets the request's id in `request.state.request_id`, adds it to the response's headers, and logs one line
    when an API request's answer ends: the id, method, path, status, and for a request that generated (whose route
    left its `Run` in `request.state.run`) its prompt and completion tokens and time to first token."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, rid = time.monotonic(), request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        header = (REQUEST_ID_HEADER.lower().encode(), rid.encode())
        status = 500  # unless a response starts: an exception escaped the app, and the outermost handler says 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["path"] not in OPEN_PATHS:  # probes and scrapes come every few seconds: not worth a line each
                log.info("%s", summary(rid, scope, status, state.get("run"), started))


def summary(rid: str, scope, status: int, run, started: float) -> str:
    """`<id> POST /v1/completions 200 prompt_tokens=5 completion_tokens=16 ttft=0.041s total=0.310s`."""
    # The path arrives percent-decoded: quoted again, a %0A in it cannot start a line of its own in the log.
    words = [rid, scope["method"], urllib.parse.quote(scope["path"]), str(status)]
    if run is not None:
        words += [f"prompt_tokens={sum(map(len, run.prompts))}", f"completion_tokens={sum(run.output_tokens)}"]
        if run.first_output_at is not None:
            words.append(f"ttft={run.first_output_at - started:.3f}s")
    return " ".join([*words, f"total={time.monotonic() - started:.3f}s"])
