"""/v1/completions and /v1/chat/completions: a request becomes engine work (a `Run`), answered whole or as an SSE
stream, and aborted when its client leaves."""
import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.config import ServerConfig
from server.errors import ApiError
from server.lifecycle import Lifecycle
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.exchange import Exchange
from server.serving import Run, cache_salt, chat_inputs, completion_inputs

TIMEOUT_HEADER = "X-Request-Timeout"  # seconds; can only shorten the server's --request-timeout


async def _unless_disconnected(request: Request, work):
    """Run `work`; if the client goes away first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()  # and the caller closes its run: a cancel that wait_for swallowed ends there
            raise ApiError(499, "client disconnected")


class EventStream(StreamingResponse):
    """An SSE response that closes its engine work however the exchange ends, even one whose client left
    before the first event."""

    def __init__(self, events, run: Run):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.close()


def request_timeout(request: Request, config: ServerConfig) -> float | None:
    header = request.headers.get(TIMEOUT_HEADER)
    if header is None:
        return config.request_timeout
    try:
        seconds = float(header)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise ApiError(400, f"{TIMEOUT_HEADER} must be a positive number of seconds, got {header!r}",
                       "invalid_request", TIMEOUT_HEADER)
    return seconds if config.request_timeout is None else min(seconds, config.request_timeout)


def router(lifecycle: Lifecycle) -> APIRouter:
    routes = APIRouter()

    async def respond(request: Request, body, inputs, chat_style: bool):
        served = lifecycle.served
        served.check_model(body.model)
        # Off the event loop: rendering and tokenizing a prompt of megabytes would stall every stream and probe.
        prompts, params, shown = await asyncio.to_thread(inputs, served, body)
        exchange = Exchange(served, chat_style, params.n, shown)
        salt = cache_salt(request.state.api_key_digest, body.cache_salt)
        run = served.start(prompts, params, exchange.id, request_timeout(request, lifecycle.config), salt)
        request.state.run = run  # its tokens and timings go into the request's log line
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(exchange.stream(run.outputs(), len(prompts), include_usage), run)
        try:
            return exchange.response(await _unless_disconnected(request, run.final_outputs()))
        finally:
            run.close()

    @routes.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await respond(request, body, completion_inputs, chat_style=False)

    @routes.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await respond(request, body, chat_inputs, chat_style=True)

    return routes
