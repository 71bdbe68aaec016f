"""From OpenAI requests to engine requests and back: prompts, limits, responses and stream chunks."""
import asyncio
import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from engine.async_engine import AsyncLLMEngine, EngineDeadError
from engine.engine import RequestRefused
from engine.outputs import RequestOutput
from engine.params import ParamError, SamplingParams
from models.default_model import DEFAULT_MODEL
from server import chat
from server.config import ServerConfig
from server.errors import ApiError
from server.exchange import Shown
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.tools import ToolUse, template_messages, tool_use


RETRY_AFTER_SECONDS = 1
# The engine's refusals as OpenAI errors: code, and the field at fault (None: the prompt's own field).
_REFUSALS = {"prompt": ("invalid_prompt", None), "length": ("context_length_exceeded", None),
             **{name: ("invalid_request", name) for name in ("stop_token_ids", "n", "best_of", "logit_bias",
                                                             "allowed_token_ids", "logprobs", "prompt_logprobs",
                                                             "structured_outputs")}}


@dataclass
class Served:
    """The model this server serves and what it needs to turn requests into engine work."""
    engine: AsyncLLMEngine
    config: ServerConfig
    templates: chat.ChatTemplates  # the model's chat templates, picked per request
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

    def chat_prompt_ids(self, messages, add_generation_prompt: bool, template_kwargs: dict | None = None,
                        tools: ToolUse | None = None, documents: list[dict] | None = None) -> list[int]:
        """The conversation (with the tools and documents the template is given) rendered and tokenized without
        adding special tokens: the template wrote BOS itself. The request's strings are plain text, markup-token
        strings in them included, unless the server lets them be markup. A template error is the client's 400."""
        tok = self.tokenizer
        special = lambda i: tok.token_text(i) if i is not None else ""  # noqa: E731
        template = self.templates.pick(tools is not None, documents is not None)
        markup = tok.markup(template or "")
        request = chat.RequestText(() if self.config.special_tokens_in_messages else tuple(markup.tokens),
                                   template or "")
        try:
            text = chat.render(template, request.escape(template_messages(messages, template, tools)),
                               add_generation_prompt, special(tok.bos_token_id),
                               special(tok.eos_token_ids[0] if tok.eos_token_ids else None),
                               request.escape(template_kwargs), request.escape(tools and tools.tools),
                               request.escape(documents))
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


def completion_inputs(served: Served, req: CompletionRequest) -> tuple[list[list[int]], SamplingParams, Shown]:
    texts = req.prompts()
    prompts, params = [served.encode(p) for p in texts], _params(served, req, req.max_tokens)
    for ids in prompts:
        served.check_fits(ids, params, "prompt", renamed={"structured_outputs": req.structured_field})
    echo = None if not req.echo else [
        text if isinstance(text, str) else served.tokenizer.decode(ids, skip_special_tokens=False)
        for text, ids in zip(texts, prompts)]
    return prompts, params, Shown(req.shown_logprobs, req.prompt_logprobs, echo)


def chat_inputs(served: Served, req: ChatCompletionRequest) -> tuple[list[list[int]], SamplingParams, Shown]:
    kwargs = dict(req.chat_template_kwargs or {})
    # vLLM let documents come as a template variable before it had the field: both reach the template as documents
    documents = req.documents if req.documents is not None else kwargs.pop("documents", None)
    tools = tool_use(req, served.templates.pick(True, documents is not None), served.config.tool_call_parser)
    ids = served.chat_prompt_ids(req.messages, req.add_generation_prompt, kwargs, tools, documents)
    params = _params(served, req, req.token_limit())
    forced = tools is not None and tools.structured is not None
    if forced:
        params = dataclasses.replace(params, structured_outputs=tools.structured)
    # chat's logprobs is a switch, top_logprobs the count; a forced call's grammar comes from the tools' schemas
    renamed = {"logprobs": "top_logprobs", "structured_outputs": "tools" if forced else req.structured_field}
    served.check_fits(ids, params, "max_completion_tokens" if req.max_completion_tokens else "messages", renamed)
    return [ids], params, Shown(req.shown_logprobs, req.prompt_logprobs, tools=tools)


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
