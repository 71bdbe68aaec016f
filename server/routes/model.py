"""The served model: its card (/v1/models) and its tokenizer (/tokenize, /detokenize)."""
import asyncio

from fastapi import APIRouter

from server.lifecycle import Lifecycle
from server.protocol import DetokenizeRequest, TokenizeRequest, now


def router(lifecycle: Lifecycle) -> APIRouter:
    routes = APIRouter()

    def model_card() -> dict:
        served = lifecycle.served
        return {"id": served.model_name, "object": "model", "created": now(), "owned_by": "nanoserve",
                "root": served.model_root, "parent": None, "max_model_len": served.max_model_len}

    @routes.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @routes.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        lifecycle.served.check_model(model_id)
        return model_card()

    @routes.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        served = lifecycle.served
        served.check_model(body.model)
        if body.messages is not None:
            tokens = await asyncio.to_thread(served.chat_prompt_ids, body.messages, body.add_generation_prompt)
        else:
            tokens = await asyncio.to_thread(served.encode, body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": served.max_model_len}

    @routes.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        served = lifecycle.served
        served.check_model(body.model)
        return {"prompt": await asyncio.to_thread(served.detokenize, body.tokens)}

    return routes
