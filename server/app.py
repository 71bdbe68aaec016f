"""The HTTP routes."""
import asyncio

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server import errors
from server.auth import require_key
from server.errors import ApiError
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, now
from server.serving import Exchange, Served, chat_inputs, completion_inputs


async def _unless_disconnected(request: Request, work):
    """Run `work`; if the client goes away first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise ApiError(499, "client disconnected")


def build_app(served: Served, api_keys: tuple[str, ...] = ()) -> FastAPI:
    app = FastAPI(title="nanoserve", description="OpenAI-compatible LLM server")
    errors.install(app)
    guarded = [Depends(require_key(api_keys))]

    async def respond(request: Request, body, inputs, chat_style: bool):
        served.check_model(body.model)
        prompts, params = inputs(served, body)
        exchange = Exchange(served, chat_style)
        runs = served.run(prompts, params, exchange.id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(exchange.stream(runs, len(prompts), include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        async def collect():
            finals = [None] * len(prompts)
            async for index, out in runs:
                finals[index] = out
            return finals
        return exchange.response(await _unless_disconnected(request, collect()))

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        return await respond(request, body, completion_inputs, chat_style=False)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await respond(request, body, chat_inputs, chat_style=True)

    def model_card() -> dict:
        return {"id": served.model_name, "object": "model", "created": now(), "owned_by": "nanoserve",
                "max_model_len": served.max_model_len}

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=guarded)
    async def model(model_id: str):
        served.check_model(model_id)
        return model_card()

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeRequest):
        served.check_model(body.model)
        if body.messages is not None:
            tokens = served.chat_prompt_ids(body.messages, body.add_generation_prompt)
        else:
            tokens = served.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": served.max_model_len}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(body: DetokenizeRequest):
        served.check_model(body.model)
        vocab = served.tokenizer.vocab_size
        if bad := [t for t in body.tokens if not 0 <= t < vocab]:
            raise ApiError(400, f"token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}", "invalid_tokens",
                           "tokens")
        return {"prompt": served.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/health")
    async def health():
        if served.engine.alive:
            return Response(status_code=200)
        return JSONResponse(errors.envelope(503, "the engine loop is not running"), 503)

    @app.get("/metrics")
    async def metrics():
        return Response(served.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
