"""What the engine hands back for each request, shaped like vLLM's `RequestOutput`."""
from dataclasses import dataclass


@dataclass
class CompletionOutput:
    index: int  # the choice: 0 .. n - 1
    text: str  # cumulative: all text so far that is safe to show
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", "error" (it failed alone) or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that matched


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
