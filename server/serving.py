"""From OpenAI requests to engine requests and back: prompts, limits, responses and stream chunks."""
import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.async_engine import AsyncLLMEngine
from engine.outputs import RequestOutput
from engine.params import SamplingParams
from server import chat
from server.errors import ApiError, envelope
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest, new_id, now


@dataclass
class Served:
    """The model this server serves and what it needs to turn requests into engine work."""
    engine: AsyncLLMEngine
    model_name: str
    chat_template: str | None
    metrics: Metrics

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model_not_found", "model")

    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def chat_prompt_ids(self, messages, add_generation_prompt: bool, **kwargs) -> list[int]:
        """The conversation rendered and tokenized without adding special tokens: the template wrote BOS
        itself. A template error is the client's 400."""
        tok = self.tokenizer
        special = lambda i: tok.token_text(i) if i is not None else ""  # noqa: E731
        try:
            text = chat.render(self.chat_template, [{"role": m.role, "content": m.text()} for m in messages],
                               add_generation_prompt, special(tok.bos_token_id),
                               special(tok.eos_token_ids[0] if tok.eos_token_ids else None), **kwargs)
        except chat.ChatTemplateError as exc:
            raise ApiError(400, str(exc), "invalid_chat_template", "messages") from exc
        return tok.encode(text, add_special_tokens=False)

    def check_length(self, ids: list[int], max_tokens: int | None, param: str) -> None:
        if not ids:
            raise ApiError(400, "the prompt is empty", "invalid_prompt", param)
        wanted = len(ids) + (max_tokens or 1)
        if wanted > self.max_model_len:
            raise ApiError(400, f"this model's maximum context length is {self.max_model_len} tokens; the "
                                f"prompt has {len(ids)} tokens and max_tokens is {max_tokens}, {wanted} in all",
                           "context_length_exceeded", param)

    async def run(self, prompts: list[list[int]], params: SamplingParams, request_id: str
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of every prompt as they come, tagged with the prompt's index. Leaving early (a
        disconnect, an error) cancels them all, which aborts them in the engine."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, ids: list[int]):
            try:
                async for out in self.engine.generate(ids, params, f"{request_id}-{index}"):
                    await queue.put((index, out))
            except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
                await queue.put((index, exc))

        tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(prompts)]
        generated: dict[int, int | None] = dict.fromkeys(range(len(prompts)), 0)  # None once finished
        try:
            while any(n is not None for n in generated.values()):
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise ApiError(400, str(item)) if isinstance(item, ValueError) else item
                generated[index] = len(item.outputs[0].token_ids)
                if item.finished:
                    generated[index] = None
                    self.metrics.finished(len(prompts[index]), len(item.outputs[0].token_ids),
                                          item.outputs[0].finish_reason)
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            for index, count in generated.items():
                if count is not None:  # left before it finished: the engine aborts it
                    self.metrics.finished(len(prompts[index]), count, "abort")


def usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Exchange:
    """One request's shapes: the full response and its stream chunks (completions or chat)."""

    def __init__(self, served: Served, chat_style: bool):
        self.served, self.chat = served, chat_style
        self.id = new_id("chatcmpl" if chat_style else "cmpl")
        self.created = now()

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.served.model_name}

    def response(self, outputs: list[RequestOutput]) -> dict:
        choices = []
        for index, out in enumerate(outputs):
            c = out.outputs[0]
            body = {"message": {"role": "assistant", "content": c.text}} if self.chat else {"text": c.text}
            choices.append({"index": index, **body, "logprobs": None, "finish_reason": c.finish_reason})
        return {**self._base("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": usage(outputs)}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return sse({**self._base("chat.completion.chunk"), "choices": [choice]})
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return sse({**self._base("text_completion"), "choices": [choice]})

    def usage_chunk(self, outputs: list[RequestOutput]) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return sse({**self._base(obj), "choices": [], "usage": usage(outputs)})

    async def stream(self, runs: AsyncIterator[tuple[int, RequestOutput]], count: int,
                     include_usage: bool) -> AsyncIterator[str]:
        """SSE events: deltas of text that is safe to show, a finish_reason per choice, usage, [DONE]."""
        sent, finals = [""] * count, [None] * count
        try:
            if self.chat:
                for index in range(count):
                    yield self.chunk(index, None, role=True)
            async for index, out in runs:
                c = out.outputs[0]
                delta = c.text[len(sent[index]):]
                sent[index] = c.text
                if delta:
                    yield self.chunk(index, delta)
                if out.finished:
                    finals[index] = out
                    yield self.chunk(index, None if self.chat else "", c.finish_reason)
            if include_usage:
                yield self.usage_chunk(finals)
        except ApiError as exc:
            yield sse(envelope(exc.status, exc.message, exc.code, exc.param))
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            yield sse(envelope(500, f"internal error: {exc}"))
        yield "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def completion_inputs(served: Served, req: CompletionRequest) -> tuple[list[list[int]], SamplingParams]:
    prompts = [served.encode(p) for p in req.prompts()]
    for ids in prompts:
        served.check_length(ids, req.max_tokens, "prompt")
    return prompts, _params(req, req.max_tokens)


def chat_inputs(served: Served, req: ChatCompletionRequest) -> tuple[list[list[int]], SamplingParams]:
    ids = served.chat_prompt_ids(req.messages, req.add_generation_prompt, **(req.chat_template_kwargs or {}))
    param = "max_completion_tokens" if req.max_completion_tokens else "messages"
    served.check_length(ids, req.token_limit(), param)
    return [ids], _params(req, req.token_limit())


def _params(req, max_tokens: int | None) -> SamplingParams:
    try:
        return req.sampling_params(max_tokens)
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_request") from exc
