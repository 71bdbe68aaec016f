"""What the engine hands back for each request, shaped like vLLM's `RequestOutput`."""
from dataclasses import dataclass


@dataclass
class TokenLogprobs:
    """One position's token and its log-probability (the log-softmax of the model's raw logits, before penalties,
    biases, temperature and truncation), with the most likely tokens there, most likely first."""
    token_id: int
    logprob: float
    rank: int  # 1 + how many tokens are more likely
    top: list[tuple[int, float]]  # (token id, logprob), as many as the request asked for


@dataclass
class CompletionOutput:
    index: int  # the choice: 0 .. n - 1
    text: str  # cumulative: all text so far that is safe to show
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", "error" (it failed alone) or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    logprobs: list[TokenLogprobs] | None = None  # one per token of token_ids, when the request asked for them
    cumulative_logprob: float | None = None  # the sum of the tokens' logprobs, when they were computed


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None

    @property
    def time_in_queue(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # every choice, in index order: finished ones keep their final state
    finished: bool  # every choice has finished
    metrics: RequestMetrics
    num_cached_tokens: int = 0  # prompt tokens whose KV blocks came from the prefix cache
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # one per prompt token, None for the first
