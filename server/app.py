"""The HTTP routes."""
import asyncio
import contextlib

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from server import errors, middleware
from server.config import ServerConfig
from server.errors import ApiError
from server.lifecycle import Lifecycle
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, now
from server.serving import Exchange, Run, cache_salt, chat_inputs, completion_inputs

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


def build_app(lifecycle: Lifecycle, metrics: Metrics) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        lifecycle.start()
        yield
        lifecycle.shutdown()

    config = lifecycle.config
    app = FastAPI(title="nanoserve", description="OpenAI-compatible LLM server", lifespan=lifespan)
    middleware.install(app, lifecycle, metrics)
    errors.install(app)

    # The routes below read `lifecycle.served`: the admission middleware lets requests in only once it is set.
    async def respond(request: Request, body, inputs, chat_style: bool):
        served = lifecycle.served
        served.check_model(body.model)
        # Off the event loop: rendering and tokenizing a prompt of megabytes would stall every stream and probe.
        prompts, params = await asyncio.to_thread(inputs, served, body)
        exchange = Exchange(served, chat_style, params.n)
        salt = cache_salt(request.state.api_key_digest, body.cache_salt)
        run = served.start(prompts, params, exchange.id, request_timeout(request, config), salt)
        request.state.run = run  # its tokens and timings go into the request's log line
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(exchange.stream(run.outputs(), len(prompts), include_usage), run)
        try:
            return exchange.response(await _unless_disconnected(request, run.final_outputs()))
        finally:
            run.close()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await respond(request, body, completion_inputs, chat_style=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await respond(request, body, chat_inputs, chat_style=True)

    def model_card() -> dict:
        return {"id": lifecycle.served.model_name, "object": "model", "created": now(), "owned_by": "nanoserve",
                "root": lifecycle.served.model_root, "parent": None, "max_model_len": lifecycle.served.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        lifecycle.served.check_model(model_id)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        served = lifecycle.served
        served.check_model(body.model)
        if body.messages is not None:
            tokens = await asyncio.to_thread(served.chat_prompt_ids, body.messages, body.add_generation_prompt)
        else:
            tokens = await asyncio.to_thread(served.encode, body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": served.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        served = lifecycle.served
        served.check_model(body.model)
        return {"prompt": await asyncio.to_thread(served.detokenize, body.tokens)}

    @app.get("/health")
    async def health():
        """Liveness: the process is loading or its engine loop runs."""
        if lifecycle.alive:
            return Response(status_code=200)
        return errors.error_response(ApiError(503, "the engine loop is not running"))

    @app.get("/ready")
    async def ready():
        """Readiness: loaded, warmed up, and not draining."""
        if lifecycle.accepting:
            return Response(status_code=200)
        return errors.error_response(ApiError(503, lifecycle.phase.value))

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
