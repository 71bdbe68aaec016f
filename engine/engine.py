"""LLMEngine: the synchronous core. Add requests, call `step()` until they finish, abort at will."""
import itertools
import logging
import time

import torch

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import BlockPool
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.params import SamplingParams
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


class LLMEngine:
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
        self._ids = itertools.count()

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request (text or token ids); a ValueError if it can never run."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = (prompt, self.tokenizer.encode(prompt)) if isinstance(prompt, str) else (None, list(prompt))
        max_tokens = self.check_request(ids, params)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device)
            generator.manual_seed(params.seed)
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.skip_special_tokens)
        self.sequences[request_id] = seq = Sequence(request_id, text, ids, params, max_tokens, detok, generator)
        self.scheduler.add(seq)
        return request_id

    def check_request(self, ids: list[int], params: SamplingParams) -> int:
        """The request's max_tokens (all that fits when it has none), or `RequestRefused` saying why it can never
        run. Reads only what never changes: any thread may call it."""
        if not ids:
            raise RequestRefused("the prompt is empty", "prompt")
        vocab = self.model_config.vocab_size
        lists = (("the prompt", ids, "prompt"), ("stop_token_ids", params.stop_token_ids, "stop_token_ids"))
        for name, tokens, what in lists:
            if bad := [t for t in tokens if not 0 <= t < vocab]:
                raise RequestRefused(f"{name} has token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}", what)
        cache_tokens = self.pool.num_blocks * self.config.block_size
        wanted = len(ids) + (params.max_tokens or 1)
        for limit, what in ((self.max_model_len, "the model's maximum context length"),
                            (cache_tokens, "the KV cache's capacity")):
            if wanted > limit:
                asked = f" and max_tokens is {params.max_tokens}, {wanted} in all" if params.max_tokens else ""
                raise RequestRefused(f"the prompt has {len(ids)} tokens{asked}: over {what} of {limit} tokens",
                                     "length")
        return params.max_tokens or min(self.max_model_len, cache_tokens) - len(ids)

    def warm_up(self) -> None:
        """One real forward pass (and sampling), so that the first request does not pay for lazy set-up."""
        self.add_request([0], SamplingParams(temperature=0, max_tokens=1), "warm-up")
        while self.has_unfinished_requests():
            self.step()

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is and free everything it holds."""
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

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
            self._append_token(seq, token)
            if seq.finished:
                self.scheduler.finish(seq)
                del self.sequences[seq.request_id]
            outputs.append(self._output(seq))
        return outputs

    def _sampling_request(self, seq: Sequence) -> SamplingRequest:
        params = seq.params
        banned = []
        if seq.num_output_tokens < params.min_tokens:
            banned = params.stop_token_ids + ([] if params.ignore_eos else list(self.tokenizer.eos_token_ids))
        return SamplingRequest(params, seq.generator, banned)

    def _append_token(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        seq.first_token_time = seq.first_token_time or time.time()
        params, produced = seq.params, seq.num_output_tokens
        if produced >= params.min_tokens and not params.ignore_eos and token in self.tokenizer.eos_token_ids:
            return self._finish(seq, "stop")
        if produced >= params.min_tokens and token in params.stop_token_ids:
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
