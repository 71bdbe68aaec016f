"""Response shapes of one request: the full body and its SSE chunks (completions or chat), with log-probabilities
and echo as the request asked."""
import functools
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from server.errors import ApiError, envelope
from server.logprobs import TextOffsets, chat_logprobs, legacy_logprobs, vllm_prompt_logprobs
from server.protocol import new_id, now
from server.tools import StreamedCalls, ToolUse, assistant_message, finish_reason

if TYPE_CHECKING:
    from server.serving import Served


def usage(outputs: list[RequestOutput]) -> dict:
    """Each prompt's tokens once (the choices share it), the tokens of every choice, and the prompt tokens whose
    KV blocks came from the prefix cache."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)}}


@dataclass(frozen=True)
class Shown:
    """What a response shows of each choice besides its text, as the request asked."""
    logprobs: int | None = None  # the most likely tokens beside each token's log-probability; None: none at all
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs: so many most likely tokens per prompt token
    echo: list[str] | None = None  # completions with echo: each prompt's text, which its choices begin with
    tools: ToolUse | None = None  # chat with tools: each choice's calls are read out of its text


@dataclass
class _Sent:
    """What a stream has sent of one choice."""
    text: str = ""  # of its completion
    tokens: int = 0  # its tokens whose log-probabilities went out
    echoed: bool = False  # with echo: its prompt went out
    ended: bool = False
    offsets: TextOffsets = field(default_factory=TextOffsets)  # where its next token's text begins
    calls: StreamedCalls | None = None  # with tools: its text as content and call deltas


class Exchange:
    """One request's shapes: the full response and its stream chunks (completions or chat). A prompt's choice i
    is numbered prompt index * n + i, as OpenAI and vLLM number the choices of several prompts."""

    def __init__(self, served: "Served", chat_style: bool, n: int = 1, shown: Shown = Shown()):
        self.served, self.chat, self.n, self.shown = served, chat_style, n, shown
        self.id = new_id("chatcmpl" if chat_style else "cmpl")
        self.created = now()

    def _index(self, prompt_index: int, choice: CompletionOutput) -> int:
        return prompt_index * self.n + choice.index

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.served.model_name}

    def response(self, outputs: list[RequestOutput]) -> dict:
        choices = [{"index": self._index(prompt_index, c), **self._choice(prompt_index, out, c)}
                   for prompt_index, out in enumerate(outputs) for c in out.outputs]
        body = {**self._base("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": usage(outputs)}
        if self.chat and self.shown.prompt_logprobs is not None:  # where vLLM puts a chat's: in the response
            body["prompt_logprobs"] = self._prompt_logprobs(outputs[0])
        return body

    def _choice(self, prompt_index: int, out: RequestOutput, c: CompletionOutput) -> dict:
        """A finished choice's text (chat: its message) and log-probabilities; with echo, the prompt's first."""
        ids, entries = c.token_ids, _entries(c, 0)
        if self.chat:
            message = assistant_message(c.text, self.shown.tools)
            return {"message": message, "logprobs": self._logprobs(ids, entries),
                    **_reasons(c, called="tool_calls" in message)}
        text = c.text
        if self.shown.echo is not None:
            echoed, prompt_ids, prompt_entries = self._echo(prompt_index, out)
            text, ids, entries = echoed + text, prompt_ids + ids, prompt_entries + entries
        choice = {"text": text, "logprobs": self._logprobs(ids, entries), **_reasons(c)}
        if self.shown.prompt_logprobs is not None:  # where vLLM puts a completion's: in each choice
            choice["prompt_logprobs"] = self._prompt_logprobs(out)
        return choice

    def _echo(self, prompt_index: int, out: RequestOutput) -> tuple[str, list[int], list[TokenLogprobs | None]]:
        """What echo puts before each choice of a prompt: its text, its tokens and their log-probabilities (the
        first None: nothing scores it)."""
        ids = out.prompt_token_ids
        return self.shown.echo[prompt_index], ids, out.prompt_logprobs or [None] * len(ids)

    def _logprobs(self, token_ids: list[int], entries: list[TokenLogprobs | None],
                  offsets: TextOffsets | None = None) -> dict | None:
        """These tokens' log-probabilities in the endpoint's shape, None when the request asked for none; `offsets`
        carries the legacy shape's text offsets on from the tokens shown before."""
        if self.shown.logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(self.served.tokenizer, entries, self.shown.logprobs)
        return legacy_logprobs(self.served.tokenizer, token_ids, entries, self.shown.logprobs,
                               offsets or TextOffsets())

    def _prompt_logprobs(self, out: RequestOutput) -> list[dict | None]:
        return vllm_prompt_logprobs(self.served.tokenizer, out.prompt_logprobs or [], self.shown.prompt_logprobs)

    def chunk(self, index: int, text: str | None, final: CompletionOutput | None = None, role: bool = False,
              include_usage: bool = False, logprobs: dict | None = None, calls: list[dict] | None = None,
              called: bool = False) -> str:
        """One choice's delta (chat: its content and tool-call deltas), with the log-probabilities of its tokens;
        `final` (its finished output) adds the finish and stop reasons, `called` saying whether it made calls.
        With include_usage every chunk but the last carries `"usage": null`, as OpenAI sends them."""
        finish = {"finish_reason": None} if final is None else _reasons(final, called)
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            delta.update({"tool_calls": calls} if calls else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, **finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, **finish}
        usage_field = {"usage": None} if include_usage else {}
        return sse({**self._base("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice],
                    **usage_field})

    def usage_chunk(self, outputs: list[RequestOutput]) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return sse({**self._base(obj), "choices": [], "usage": usage(outputs)})

    async def stream(self, outputs: AsyncIterator[tuple[int, RequestOutput] | None], count: int,
                     include_usage: bool) -> AsyncIterator[str]:
        """SSE events: deltas of text that is safe to show, the choices of `count` prompts interleaved, a
        finish_reason per choice, usage, [DONE]; a `: ping` comment whenever the engine was silent for a while
        (queued, or a long prefill)."""
        tools = self.shown.tools
        sent = [_Sent(calls=tools and StreamedCalls(tools)) for _ in range(count * self.n)]
        finals = [None] * count
        chunk = functools.partial(self.chunk, include_usage=include_usage)
        try:
            if self.chat:
                for index in range(count * self.n):
                    yield chunk(index, None, role=True)
            async for item in outputs:
                if item is None:
                    yield ": ping\n\n"
                    continue
                prompt_index, out = item
                for event in self._choice_chunks(prompt_index, out, sent, chunk):
                    yield event
                if out.finished:
                    finals[prompt_index] = out
            if include_usage:
                yield self.usage_chunk(finals)
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            error = exc if isinstance(exc, ApiError) else ApiError(500, f"internal error: {exc}")
            self.served.metrics.errors.labels(status=str(error.status)).inc()
            yield sse(envelope(error.status, error.message, error.code, error.param))
        yield "data: [DONE]\n\n"

    def _choice_chunks(self, prompt_index: int, out: RequestOutput, sent: list[_Sent],
                       chunk: Callable[..., str]) -> Iterator[str]:
        """What one output of a prompt adds to the stream: with echo, first the prompt; then each choice's new
        text, and its finish once (the engine keeps sending a finished choice's final state while its siblings
        run). The detokenizer holds text back, so text and tokens do not pair up: each chunk carries the
        log-probabilities of the tokens that came since the choice's last chunk. `sent` records it."""
        for c in out.outputs:
            index = self._index(prompt_index, c)
            progress = sent[index]
            if progress.ended:
                continue
            if self.shown.echo is not None and not progress.echoed:
                progress.echoed = True
                echoed, ids, entries = self._echo(prompt_index, out)
                yield chunk(index, echoed, logprobs=self._logprobs(ids, entries, progress.offsets))
            delta, calls = c.text[len(progress.text):], None
            progress.text = c.text
            if progress.calls is not None:
                delta, calls = progress.calls.feed(delta, c.finish_reason is not None)
            if delta or calls:
                yield chunk(index, delta or None, logprobs=self._new_logprobs(c, progress), calls=calls)
            if c.finish_reason is not None:
                progress.ended = True
                yield chunk(index, None, c, logprobs=self._new_logprobs(c, progress),
                            called=progress.calls is not None and progress.calls.called)

    def _new_logprobs(self, c: CompletionOutput, progress: _Sent) -> dict | None:
        """The log-probabilities of the choice's tokens that no chunk carried yet, now counted as sent; None when
        no token came."""
        start = progress.tokens
        if start == len(c.token_ids):
            return None
        progress.tokens = len(c.token_ids)
        return self._logprobs(c.token_ids[start:], _entries(c, start), progress.offsets)


def _entries(c: CompletionOutput, start: int) -> list[TokenLogprobs]:
    """The log-probabilities of a choice's tokens from `start` on (none when not computed). The engine goes on
    appending to its list after it handed the output over: the tokens' count bounds them."""
    return (c.logprobs or [])[start:len(c.token_ids)]


def _reasons(output: CompletionOutput, called: bool = False) -> dict:
    """Why a choice ended: OpenAI's finish_reason (`tool_calls` when it ended with calls), and vLLM's stop_reason
    (the stop string or token id that ended it, null for EOS, length and a grammar's end)."""
    return {"finish_reason": finish_reason(output.finish_reason, called, output.stop_reason),
            "stop_reason": output.stop_reason}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
