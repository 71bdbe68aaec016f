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
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.params import SamplingParams, is_whole
from engine.runner import ModelRunner
from engine.sampler import Sampler, SamplingRequest
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence, Status
from models.default_model import resolve_model
from models.loader import load_config
from models.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class RequestRefused(ValueError):
    """A request that can never run. `what`: "prompt" (empty, or ids outside the vocabulary), "stop_token_ids",
    or "length" (the prompt and max_tokens together exceed the context length or the whole KV cache)."""

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
        self.runner = ModelRunner(config, self.model_path, self.model_config)
        self.pool = BlockPool(self.runner.num_blocks)
        budget = config.max_num_batched_tokens or self.max_model_len
        if budget < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens ({budget}) must be at least max_model_len "
                             f"({self.max_model_len}): a prompt runs in one step")
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, budget, config.block_size), self.pool)
        self.sampler = Sampler(self.runner.device, config.seed)
        self.sequences: dict[str, Sequence] = {}
        self._lock = threading.RLock()

    @_one_at_a_time
    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request (text or token ids); a ValueError if it can never run."""
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = (prompt, self.tokenize(prompt)) if isinstance(prompt, str) else (None, _token_ids(prompt))
        max_tokens = self.check_request(ids, params)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device)
            generator.manual_seed(params.seed)
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop_patterns, params.skip_special_tokens)
        banned = None
        if params.min_tokens:  # built once: a step only indexes the logits with it
            eos = () if params.ignore_eos else self.tokenizer.eos_token_ids
            banned = torch.tensor(sorted(params.stop_token_set.union(eos)), dtype=torch.long, device=self.runner.device)
        seq = Sequence(request_id, text, ids, params, max_tokens, detok, generator, banned)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        return request_id

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
        lists = (("the prompt", ids, "prompt"), ("stop_token_ids", params.stop_token_ids, "stop_token_ids"))
        for name, tokens, what in lists:
            if bad := [t for t in tokens if not 0 <= t < vocab]:
                raise RequestRefused(f"{name} has token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}", what)
        return params.max_tokens or self._max_tokens_in_context() - len(ids)

    def warm_up(self) -> None:
        """One real forward pass (and sampling), so that the first request does not pay for lazy set-up."""
        self.add_request([0], SamplingParams(temperature=0, max_tokens=1), "warm-up")
        while self.has_unfinished_requests():
            self.step()

    @_one_at_a_time
    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is and free everything it holds."""
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @_one_at_a_time
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample, update the sequences, free the finished, emit outputs."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits = self.runner.execute(batch)
        tokens = self.sampler(logits, [self._sampling_request(seq) for seq in batch.seqs])
        outputs = []
        for seq, count, token in zip(batch.seqs, batch.num_new_tokens, tokens):
            seq.num_computed_tokens += count
            self._update(seq, token)
            if seq.finished:
                self.scheduler.finish(seq)
                del self.sequences[seq.request_id]
            outputs.append(self._output(seq))
        return outputs

    def _sampling_request(self, seq: Sequence) -> SamplingRequest:
        banned = seq.banned_token_ids if seq.num_output_tokens < seq.params.min_tokens else None
        return SamplingRequest(seq.params, seq.generator, banned)

    def _update(self, seq: Sequence, token: int) -> None:
        """Append the sampled token; a request whose update fails ends with finish_reason "error", alone."""
        try:
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
        if produced >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    @staticmethod
    def _finish(seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        seq.detokenizer.flush()
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason
        seq.finished_time = time.time()

    def _output(self, seq: Sequence) -> RequestOutput:
        completion = CompletionOutput(0, seq.detokenizer.visible_text(seq.finished), seq.output_token_ids,
                                      seq.finish_reason, seq.stop_reason)
        metrics = RequestMetrics(seq.arrival_time, seq.first_scheduled_time, seq.first_token_time,
                                 seq.finished_time)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion], seq.finished, metrics)


def _token_ids(prompt) -> list[int]:
    """A token-id prompt as a list of ints (numpy's included); floats and bools are refused, not truncated."""
    ids = list(prompt)
    if not all(map(is_whole, ids)):
        raise RequestRefused("a token-id prompt must hold whole numbers only", "prompt")
    return [int(t) for t in ids]
