"""Per-request state, owned by the engine from `add_request` until the request finishes."""
import enum
import time
from dataclasses import dataclass, field

import torch

from engine.controls import TokenControls
from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import TokenLogprobs
from engine.params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity, not field equality: queues look sequences up
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens, or what the context length leaves when it is None
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None  # set when the request has its own seed
    controls: TokenControls | None = None  # allowed tokens, bad words, biases, min_tokens' bans; shared by choices
    index: int = 0  # which of the request's n choices
    grammar: object | None = None  # its own llguidance matcher, when the output is constrained (engine/grammar.py)
    cache_salt: str | None = None  # prefix-cache blocks are shared only among sequences of the same salt
    forks: list["Sequence"] = field(default_factory=list)  # the other choices, forked once the prompt is computed
    token_ids: list[int] = field(default_factory=list)  # prompt then output
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks of token_ids, as far as known
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when it was first scheduled
    logprobs: list[TokenLogprobs] | None = None  # of each output token, when the request asks for them
    cumulative_logprob: float = 0.0  # of the output tokens, when logprobs are computed
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # of each prompt token, when asked (by choice 0)
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    arrival_time: float = field(default_factory=time.time)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
