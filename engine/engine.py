"""LLMEngine: the synchronous core. Add requests, call `step()` until they finish, abort at will."""
import functools
import logging
import threading
import time
import uuid

import torch

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import BlockPool
from engine.controls import TokenControls
from engine.grammar import GrammarError, Grammars, advance
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs
from engine.params import SamplingParams, is_whole
from engine.runner import ModelRunner, ScoredPrompt
from engine.sampler import Sampler, SamplingRequest, prompt_logprobs
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence, Status
from models.default_model import resolve_model
from models.loader import load_config
from models.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class RequestRefused(ValueError):
    """A request that can never run. `what`: "prompt" (empty, or ids outside the vocabulary), "length" (the prompt
    and max_tokens together exceed the context length or the whole KV cache), "n" or "best_of" (more sequences than
    the batch has seats), or the parameter at fault: "stop_token_ids", "logit_bias" or "allowed_token_ids" (ids
    outside the vocabulary), "logprobs" or "prompt_logprobs" (over max_logprobs)."""

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what


def _one_at_a_time(method):
    """Runs `method` under the engine's lock: an abort from another thread waits for the step in progress."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class LLMEngine:
    """The engine's methods may be called from any thread; they run one at a time."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_path = resolve_model(config.model)
        self.model_config = load_config(self.model_path)
        self.tokenizer = load_tokenizer(self.model_path)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.runner = ModelRunner(config, self.model_path, self.model_config, self.max_model_len)
        self.pool = BlockPool(self.runner.num_blocks)
        budget = config.max_num_batched_tokens or self._default_token_budget()
        if budget < self.max_model_len and not config.enable_chunked_prefill:
            raise ValueError(f"max_num_batched_tokens ({budget}) must be at least max_model_len "
                             f"({self.max_model_len}) without chunked prefill: a prompt runs in one step")
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, budget, config.block_size,
                                                   config.enable_chunked_prefill, config.enable_prefix_caching),
                                   self.pool)
        self.sampler = Sampler(self.runner.device, config.seed)
        self.grammars = Grammars(self.tokenizer, self.model_config.vocab_size)
        self.requests: dict[str, list[Sequence]] = {}  # each request's choices, in index order
        self._lock = threading.RLock()

    def _default_token_budget(self) -> int:
        """Without chunked prefill a whole prompt must fit a step; with it, the runner's step size for its device."""
        return self.runner.chunked_prefill_tokens if self.config.enable_chunked_prefill else self.max_model_len

    def on_failure(self, callback) -> None:
        """`callback(error)` runs, on another thread, if a tensor-parallel rank dies: no step can run after it."""
        if self.runner.group is not None:
            self.runner.group.on_failure(callback)

    @_one_at_a_time
    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    cache_salt: str | None = None) -> str:
        """Queue a request (text or token ids); a ValueError if it can never run. It shares cached prompt blocks
        only with requests of the same `cache_salt`."""
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = (prompt, self.tokenize(prompt)) if isinstance(prompt, str) else (None, _token_ids(prompt))
        max_tokens = self.check_request(ids, params)
        controls = TokenControls.build(params, ids, self.tokenizer.eos_token_ids,
                                       functools.partial(self.tokenizer.encode, add_special_tokens=False),
                                       self.runner.device)
        choices = [Sequence(request_id, text, ids, params, max_tokens,
                            IncrementalDetokenizer(self.tokenizer, ids, params.stop_patterns, params.skip_special_tokens),
                            self._generator(params.seed, index), controls, index, grammar, cache_salt,
                            logprobs=None if params.logprobs is None else [])
                   for index, grammar in enumerate(self._grammars(params))]
        if params.prompt_logprobs is not None:  # the prompt is the request's: its first choice scores it
            choices[0].prompt_logprobs = [None] * len(ids)
        choices[0].forks = choices[1:]
        self.requests[request_id] = choices
        self.scheduler.add(choices[0])
        return request_id

    def _generator(self, seed: int | None, index: int) -> torch.Generator | None:
        """Choice `index`'s own generator when the request has a seed: seeded with seed + index (wrapped into the
        signed 64-bit range), so that choice 0 draws as a request with n = 1 would."""
        if seed is None:
            return None
        generator = torch.Generator(device=self.runner.device)
        generator.manual_seed((seed + index + 2**63) % 2**64 - 2**63)
        return generator

    def _grammars(self, params: SamplingParams) -> list:
        """Each choice's own grammar matcher, or None each when the output is free."""
        if params.structured_outputs is None:
            return [None] * params.num_candidates
        return self.grammars.matchers(params.structured_outputs, params.num_candidates)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A prompt's token ids, once `check_prompt_chars` lets it through."""
        self.check_prompt_chars(text)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_prompt_chars(self, text: str) -> None:
        """`RequestRefused` when the prompt has more characters than the longest prompt that fits can have: it is
        refused without tokenizing it (tokenizing megabytes takes seconds)."""
        limit, per_token = self._max_tokens_in_context(), self.tokenizer.max_chars_per_token
        if per_token is not None and len(text) > limit * per_token:
            raise RequestRefused(f"the prompt has {len(text)} characters: more than the {limit} tokens of the context "
                                 f"can hold (a token stands for at most {per_token})", "length")

    def _max_tokens_in_context(self) -> int:
        return min(self.max_model_len, self._cache_tokens)

    @property
    def _cache_tokens(self) -> int:
        return self.pool.num_blocks * self.config.block_size

    def check_request(self, ids: list[int], params: SamplingParams) -> int:
        """The request's max_tokens (all that fits when it has none), or `RequestRefused` saying why it can never
        run. Reads only what never changes: any thread may call it."""
        if not ids:
            raise RequestRefused("the prompt is empty", "prompt")
        wanted = len(ids) + (params.max_tokens or 1)
        for limit, what in ((self.max_model_len, "the model's maximum context length"),
                            (self._cache_tokens, "the KV cache's capacity")):
            if wanted > limit:  # checked first: it costs nothing, and bounds the scans below
                asked = f" and max_tokens is {params.max_tokens}, {wanted} in all" if params.max_tokens else ""
                raise RequestRefused(f"the prompt has {len(ids)} tokens{asked}: over {what} of {limit} tokens",
                                     "length")
        vocab = self.model_config.vocab_size
        for name, tokens in (("prompt", ids), ("stop_token_ids", params.stop_token_ids),
                             ("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ())):
            if bad := [t for t in tokens if not 0 <= t < vocab]:
                held = "the prompt" if name == "prompt" else name
                raise RequestRefused(f"{held} has token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}", name)
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > self.config.max_logprobs:
                raise RequestRefused(f"{name} is {getattr(params, name)}: more than this server returns "
                                     f"({self.config.max_logprobs}, max_logprobs)", name)
        if params.num_candidates > self.config.max_num_seqs:
            name = "n" if params.best_of is None else "best_of"
            raise RequestRefused(f"{name} is {params.num_candidates}: more sequences than the "
                                 f"{self.config.max_num_seqs} a batch runs at once (max_num_seqs)", name)
        if params.structured_outputs is not None:
            try:  # compiled here, on the caller's thread; cached for add_request
                self.grammars.compile(params.structured_outputs)
            except GrammarError as exc:
                raise RequestRefused(str(exc), "structured_outputs") from exc
        return self._max_tokens_in_context() - len(ids) if params.max_tokens is None else params.max_tokens

    def warm_up(self) -> None:
        """One real forward pass (and sampling), so that the first request does not pay for lazy set-up."""
        self.add_request([0], SamplingParams(temperature=0, max_tokens=1), "warm-up")
        while self.has_unfinished_requests():
            self.step()

    @_one_at_a_time
    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is and free everything its choices hold."""
        for seq in self.requests.pop(request_id, ()):
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @_one_at_a_time
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, score prompts, sample, update the sequences, free the finished, emit outputs."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits = self.runner.execute(batch)
        for scored in logits.prompts:
            _score_prompt(scored)
        due = self.scheduler.advance(batch)  # (row, sequence): who samples; a prompt's choices share its row
        sampled = self.sampler(logits.last, [self._sampling_request(row, seq) for row, seq in due])
        for (_, seq), token, logprobs in zip(due, sampled.token_ids, sampled.logprobs):
            self._update(seq, token, logprobs)
            if seq.finished:
                self.scheduler.finish(seq)
        return [self._output(request_id) for request_id in dict.fromkeys(seq.request_id for _, seq in due)]

    @staticmethod
    def _sampling_request(row: int, seq: Sequence) -> SamplingRequest:
        return SamplingRequest(seq.params, seq.controls, seq.token_ids, len(seq.prompt_token_ids), row, seq.generator,
                               seq.grammar)

    def _update(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> None:
        """Append the sampled token; a request whose update fails ends with finish_reason "error", alone."""
        try:
            if seq.max_tokens == 0:  # the prompt is scored, nothing is generated
                return self._finish(seq, "length")
            if logprobs is not None:
                seq.cumulative_logprob += logprobs.logprob
                if seq.logprobs is not None:
                    seq.logprobs.append(logprobs)
            self._append_token(seq, token)
        except Exception:  # noqa: BLE001 - one request's fault must not end the step for the others
            log.exception("request %s failed; ending it", seq.request_id)
            seq.status, seq.finish_reason, seq.finished_time = Status.FINISHED, "error", time.time()

    def _append_token(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        seq.first_token_time = seq.first_token_time or time.time()
        params, produced = seq.params, seq.num_output_tokens
        if produced >= params.min_tokens and not params.ignore_eos and token in self.tokenizer.eos_token_ids:
            return self._finish(seq, "stop")
        if produced >= params.min_tokens and token in params.stop_token_set:
            return self._finish(seq, "stop", token)
        seq.detokenizer.add_token(token, match_stop=produced >= params.min_tokens)
        if seq.detokenizer.stop_string is not None:
            return self._finish(seq, "stop", seq.detokenizer.stop_string)
        if seq.grammar is not None and advance(seq.grammar, token):  # the output is complete: nothing may follow
            return self._finish(seq, "stop")
        if produced >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    @staticmethod
    def _finish(seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        seq.detokenizer.flush()
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason
        seq.finished_time = time.time()

    def _output(self, request_id: str) -> RequestOutput:
        """Every choice of the request as it stands (once finished, the n best of best_of candidates); a finished
        request is forgotten."""
        choices = self.requests[request_id]
        finished = all(seq.finished for seq in choices)
        if finished:
            del self.requests[request_id]
        first, returned = choices[0], choices
        if finished and len(choices) > first.params.n:  # best_of: the highest cumulative logprobs, best first
            returned = sorted(choices, key=lambda seq: -seq.cumulative_logprob)[:first.params.n]
        completions = [self._completion(index if returned is not choices else seq.index, seq)
                       for index, seq in enumerate(returned)]
        metrics = RequestMetrics(first.arrival_time, first.first_scheduled_time, first.first_token_time,  # it forks
                                 max(seq.finished_time for seq in choices) if finished else None)
        return RequestOutput(request_id, first.prompt, first.prompt_token_ids, completions, finished, metrics,
                             first.num_cached_tokens, first.prompt_logprobs)

    @staticmethod
    def _completion(index: int, seq: Sequence) -> CompletionOutput:
        return CompletionOutput(index, seq.detokenizer.visible_text(seq.finished), seq.output_token_ids,
                                seq.finish_reason, seq.stop_reason, None if seq.logprobs is None else list(seq.logprobs),
                                seq.cumulative_logprob if seq.params.scored else None)


def _score_prompt(scored: ScoredPrompt) -> None:
    """Fill in the logprobs of the prompt tokens that this chunk's logits score."""
    seq, start = scored.seq, scored.start
    end = min(start + len(scored.logits), len(seq.prompt_token_ids) - 1)  # the last position scores the output
    targets = seq.prompt_token_ids[start + 1:end + 1]
    seq.prompt_logprobs[start + 1:end + 1] = prompt_logprobs(scored.logits[:len(targets)], targets,
                                                             seq.params.prompt_logprobs)


def _token_ids(prompt) -> list[int]:
    """A token-id prompt as a list of ints (numpy's included); floats and bools are refused, not truncated."""
    ids = list(prompt)
    if not all(map(is_whole, ids)):
        raise RequestRefused("a token-id prompt must hold whole numbers only", "prompt")
    return [int(t) for t in ids]
