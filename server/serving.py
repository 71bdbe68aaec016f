"""From OpenAI requests to engine requests and back: prompts, limits, responses and stream chunks."""
import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from engine.async_engine import AsyncLLMEngine, EngineDeadError
from engine.engine import RequestRefused
from engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from engine.params import ParamError, SamplingParams
from models.default_model import DEFAULT_MODEL
from server import chat
from server.config import ServerConfig
from server.errors import ApiError, envelope
from server.logprobs import TextOffsets, chat_logprobs, legacy_logprobs, vllm_prompt_logprobs
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest, new_id, now


RETRY_AFTER_SECONDS = 1
# The engine's refusals as OpenAI errors: code, and the field at fault (None: the prompt's own field).
_REFUSALS = {"prompt": ("invalid_prompt", None), "length": ("context_length_exceeded", None),
             **{name: ("invalid_request", name) for name in ("stop_token_ids", "n", "best_of", "logit_bias",
                                                             "allowed_token_ids", "logprobs", "prompt_logprobs")}}


@dataclass
class Served:
    """The model this server serves and what it needs to turn requests into engine work."""
    engine: AsyncLLMEngine
    config: ServerConfig
    chat_template: str | None
    metrics: Metrics
    queued: int = 0  # sequences (each prompt's n choices) admitted whose prompt's first output has not come yet
    runs: set["Run"] = field(default_factory=set)

    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def model_root(self) -> str:
        """The model as the operator named it (`--model`, a folder or file): vLLM's `root` in /v1/models."""
        return self.engine.engine.config.model or DEFAULT_MODEL

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model_not_found", "model")

    def encode(self, prompt: str | list[int], add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        tokenize = functools.partial(self.tokenizer.encode, add_special_tokens=add_special_tokens)
        return self._checked_tokenize(prompt, tokenize, param)

    def _checked_tokenize(self, text: str, tokenize: Callable[[str], list[int]], param: str) -> list[int]:
        """`tokenize(text)`, once the text passes the checks every text prompt passes: valid Unicode, and no more
        characters than the context can hold (refused without tokenizing: megabytes take seconds)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ApiError(400, f"the text is not valid Unicode: {exc.reason} at {exc.start}", "invalid_text",
                           param) from exc
        with _refusal_as_400(param):
            self.engine.engine.check_prompt_chars(text)
        return tokenize(text)

    def chat_prompt_ids(self, messages, add_generation_prompt: bool, template_kwargs: dict | None = None) -> list[int]:
        """The conversation rendered and tokenized without adding special tokens: the template wrote BOS
        itself. The request's strings are plain text, markup-token strings in them included, unless the server lets
        them be markup. A template error is the client's 400."""
        tok = self.tokenizer
        special = lambda i: tok.token_text(i) if i is not None else ""  # noqa: E731
        markup = tok.markup(self.chat_template or "")
        request = chat.RequestText(() if self.config.special_tokens_in_messages else tuple(markup.tokens),
                                   self.chat_template or "")
        try:
            text = chat.render(self.chat_template, request.escape([m.for_template() for m in messages]),
                               add_generation_prompt, special(tok.bos_token_id),
                               special(tok.eos_token_ids[0] if tok.eos_token_ids else None),
                               request.escape(template_kwargs))
        except chat.ChatTemplateError as exc:
            raise ApiError(400, str(exc), "invalid_chat_template", exc.param) from exc
        if not request.escaped:  # the common case: the library reads the rendering as it is
            return self.encode(text, add_special_tokens=False, param="messages")
        # the markup strings in `text` are the template's; the request's are placeholders, brought back as text
        return self._checked_tokenize(text, functools.partial(markup.encode, plain=request.unescape), "messages")

    def detokenize(self, tokens: list[int]) -> str:
        """`/detokenize`: at most a context's worth of ids (a few MiB of JSON carry millions), all in the vocabulary."""
        if len(tokens) > self.max_model_len:
            raise ApiError(400, f"{len(tokens)} token ids: more than the context's {self.max_model_len}",
                           "invalid_tokens", "tokens")
        vocab = self.tokenizer.vocab_size
        if bad := [t for t in tokens if not 0 <= t < vocab]:
            raise ApiError(400, f"token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}", "invalid_tokens",
                           "tokens")
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def check_fits(self, ids: list[int], params: SamplingParams, param: str, renamed: dict[str, str] | None = None
                   ) -> None:
        """The engine's own checks, run before any response starts: a refused stream is a 400, not an error
        event after a 200. `param` names the prompt's field, to which a length error is charged too; `renamed`
        maps the engine's names of other fields to the request's."""
        with _refusal_as_400(param, renamed):
            self.engine.engine.check_request(ids, params)

    def start(self, prompts: list[list[int]], params: SamplingParams, request_id: str, timeout: float | None,
              cache_salt: str | None) -> "Run":
        """Admit a request's sequences (each prompt's n choices, or best_of candidates) to the engine, or refuse them
        (429) when the queue is full."""
        limit, count = self.config.max_queued_requests, len(prompts) * params.num_candidates
        if count > limit:
            name = _choices_field(params)
            raise ApiError(400, f"{count} sequences in one request ({len(prompts)} prompts, {name}="
                                f"{params.num_candidates}), more than the server queues at once ({limit})",
                           "too_many_prompts", name if params.num_candidates > 1 else "prompt")
        if self.queued + count > limit:
            raise ApiError(429, f"the server is busy: {self.queued} sequences are waiting to start (at most {limit}); "
                                "retry later", "rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        return Run(self, prompts, params, request_id, timeout, cache_salt)

    def stop_all(self, error: ApiError) -> None:
        """End every request in progress with `error` (the drain timed out)."""
        for run in list(self.runs):
            run.queue.put_nowait((None, error))


class Run:
    """The engine work of one HTTP request: the outputs of each prompt (all its sequences) as they come, tagged
    with the prompt's index; None as a keep-alive tick after each `sse_ping_interval` of silence; an error past
    the deadline. `close()` aborts whatever has not finished, whoever calls it and however often."""

    def __init__(self, served: Served, prompts: list[list[int]], params: SamplingParams, request_id: str,
                 timeout: float | None, cache_salt: str | None):
        self.served, self.prompts, self.timeout = served, prompts, timeout
        self.per_prompt = params.num_candidates  # sequences each prompt runs
        loop = asyncio.get_running_loop()
        self.deadline = None if timeout is None else loop.time() + timeout
        self.queue: asyncio.Queue = asyncio.Queue()
        self.running: dict[int, RequestOutput] = {}  # the latest output of prompts that started and did not finish
        self.waiting = set(range(len(prompts)))  # prompts with no output yet
        self.last_output = [0.0] * len(prompts)
        # For the request's log line (server/middleware.py): when the first token came, and each prompt's tokens out
        # (all its choices together).
        self.first_output_at: float | None = None
        self.output_tokens = [0] * len(prompts)
        self.closed = False
        self.failed = False  # an error came in (a refused prompt, the drain, a dead engine): no aborts to count
        self.tasks = [asyncio.create_task(self._pump(i, ids, params, f"{request_id}-{i}", cache_salt))
                      for i, ids in enumerate(prompts)]
        served.queued += len(prompts) * self.per_prompt
        served.runs.add(self)

    async def _pump(self, index: int, ids: list[int], params: SamplingParams, request_id: str,
                    cache_salt: str | None) -> None:
        try:
            async for out in self.served.engine.generate(ids, params, request_id, cache_salt):
                self.queue.put_nowait((index, out))
        except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
            self.queue.put_nowait((index, exc))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput] | None]:
        while (self.waiting or self.running) and not self.closed:
            try:
                index, item = await asyncio.wait_for(self.queue.get(), self._quiet_time())
            except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
                if self.deadline is not None and asyncio.get_running_loop().time() >= self.deadline:
                    raise ApiError(408, f"the request did not finish within its timeout of {self.timeout:g} s",
                                   "request_timeout") from None
                yield None
                continue
            if self.closed:  # `close()` woke us (a cancelled wait_for may still have taken an item)
                return
            if isinstance(item, Exception):
                self.failed = True
                raise _as_api_error(item)
            self._observe(index, item)
            yield index, item

    async def final_outputs(self) -> list[RequestOutput]:
        """Each prompt's last output (a non-streaming answer), once every prompt has finished."""
        finals = [None] * len(self.prompts)
        async for item in self.outputs():
            if item is not None:
                finals[item[0]] = item[1]
        return finals

    def _quiet_time(self) -> float:
        quiet = self.served.config.sse_ping_interval
        if self.deadline is not None:
            quiet = min(quiet, max(self.deadline - asyncio.get_running_loop().time(), 0))
        return quiet

    def _observe(self, index: int, out: RequestOutput) -> None:
        metrics, now = self.served.metrics, time.monotonic()
        if index in self.waiting:
            self.waiting.discard(index)
            self.served.queued -= self.per_prompt  # the prompt has started, and with it its sequences
            self.first_output_at = self.first_output_at or now
        else:
            metrics.inter_token_latency.observe(now - self.last_output[index])
        self.last_output[index] = now
        self.output_tokens[index] = sum(len(c.token_ids) for c in out.outputs)
        if out.finished:
            self.running.pop(index, None)
            metrics.finished(out)
        else:
            self.running[index] = out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.put_nowait((None, None))
        self.served.runs.discard(self)
        self.served.queued -= len(self.waiting) * self.per_prompt
        for task in self.tasks:
            task.cancel()  # which aborts the request in the engine
        for index in () if self.failed else self.waiting:
            self.served.metrics.aborted(len(self.prompts[index]), [0] * self.per_prompt)
        for index, out in self.running.items():
            self.served.metrics.aborted(len(self.prompts[index]), [len(c.token_ids) for c in out.outputs])


@contextlib.contextmanager
def _refusal_as_400(param: str, renamed: dict[str, str] | None = None):
    """The engine's refusals as the client's 400s; `param` names the prompt's field, which a length error is
    charged to as well, and `renamed` the request's names of the engine's other fields."""
    try:
        yield
    except RequestRefused as exc:
        code, field = _REFUSALS[exc.what]
        raise ApiError(400, str(exc), code, (renamed or {}).get(field, field) or param) from exc


def _as_api_error(exc: Exception) -> Exception:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValueError):
        return ApiError(400, str(exc), "invalid_request")
    if isinstance(exc, EngineDeadError):
        return ApiError(500, str(exc), "engine_dead")
    return exc


def cache_salt(api_key_digest: str | None, salt: str | None) -> str | None:
    """What the engine separates cached prompt blocks by: the request's `cache_salt`, and with API keys the key's
    digest as well, so that one tenant can never probe another's prompts through time to first token. As JSON,
    no pair of key and salt can spell another pair's."""
    return salt if api_key_digest is None else json.dumps([api_key_digest, salt])


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


@dataclass
class _Sent:
    """What a stream has sent of one choice."""
    text: str = ""  # of its completion
    tokens: int = 0  # its tokens whose log-probabilities went out
    echoed: bool = False  # with echo: its prompt went out
    ended: bool = False
    offsets: TextOffsets = field(default_factory=TextOffsets)  # where its next token's text begins


class Exchange:
    """One request's shapes: the full response and its stream chunks (completions or chat). A prompt's choice i
    is numbered prompt index * n + i, as OpenAI and vLLM number the choices of several prompts."""

    def __init__(self, served: Served, chat_style: bool, n: int = 1, shown: Shown = Shown()):
        self.served, self.chat, self.n, self.shown = served, chat_style, n, shown
        self.id = new_id("chatcmpl" if chat_style else "cmpl")
        self.created = now()

    def _index(self, prompt_index: int, choice: CompletionOutput) -> int:
        return prompt_index * self.n + choice.index

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.served.model_name}

    def response(self, outputs: list[RequestOutput]) -> dict:
        choices = [{"index": self._index(prompt_index, c), **self._choice(prompt_index, out, c), **_reasons(c)}
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
            return {"message": {"role": "assistant", "content": c.text}, "logprobs": self._logprobs(ids, entries)}
        text = c.text
        if self.shown.echo is not None:
            echoed, prompt_ids, prompt_entries = self._echo(prompt_index, out)
            text, ids, entries = echoed + text, prompt_ids + ids, prompt_entries + entries
        choice = {"text": text, "logprobs": self._logprobs(ids, entries)}
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
              include_usage: bool = False, logprobs: dict | None = None) -> str:
        """One choice's delta, with the log-probabilities of its tokens; `final` (its finished output) adds the
        finish and stop reasons. With include_usage every chunk but the last carries `"usage": null`, as OpenAI
        sends them."""
        finish = {"finish_reason": None} if final is None else _reasons(final)
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
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
        sent, finals = [_Sent() for _ in range(count * self.n)], [None] * count
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
            delta = c.text[len(progress.text):]
            progress.text = c.text
            if delta:
                yield chunk(index, delta, logprobs=self._new_logprobs(c, progress))
            if c.finish_reason is not None:
                progress.ended = True
                yield chunk(index, None, c, logprobs=self._new_logprobs(c, progress))

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


def _reasons(output: CompletionOutput) -> dict:
    """Why a choice ended: OpenAI's finish_reason, and vLLM's stop_reason (the stop string or token id that
    ended it, null for EOS and length)."""
    return {"finish_reason": output.finish_reason, "stop_reason": output.stop_reason}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def completion_inputs(served: Served, req: CompletionRequest) -> tuple[list[list[int]], SamplingParams, Shown]:
    texts = req.prompts()
    prompts, params = [served.encode(p) for p in texts], _params(served, req, req.max_tokens)
    for ids in prompts:
        served.check_fits(ids, params, "prompt")
    echo = None if not req.echo else [
        text if isinstance(text, str) else served.tokenizer.decode(ids, skip_special_tokens=False)
        for text, ids in zip(texts, prompts)]
    return prompts, params, Shown(req.shown_logprobs, req.prompt_logprobs, echo)


def chat_inputs(served: Served, req: ChatCompletionRequest) -> tuple[list[list[int]], SamplingParams, Shown]:
    ids = served.chat_prompt_ids(req.messages, req.add_generation_prompt, req.chat_template_kwargs)
    params = _params(served, req, req.token_limit())
    served.check_fits(ids, params, "max_completion_tokens" if req.max_completion_tokens else "messages",
                      renamed={"logprobs": "top_logprobs"})  # chat's logprobs is a switch; top_logprobs the count
    return [ids], params, Shown(req.shown_logprobs, req.prompt_logprobs)


def _params(served: Served, req, max_tokens: int | None) -> SamplingParams:
    try:
        params = req.sampling_params(max_tokens)
    except ParamError as exc:
        param = exc.param
        if param == "max_tokens" and getattr(req, "max_completion_tokens", None):
            param = "max_completion_tokens"  # the chat field the limit came from
        raise ApiError(400, str(exc), "invalid_request", param) from exc
    if params.num_candidates > served.config.max_n:
        name = _choices_field(params)
        raise ApiError(400, f"{name} is {params.num_candidates}, more than this server allows ({served.config.max_n})",
                       "invalid_request", name)
    return params


def _choices_field(params: SamplingParams) -> str:
    """The field that sets how many sequences each prompt runs."""
    return "n" if params.best_of is None else "best_of"
