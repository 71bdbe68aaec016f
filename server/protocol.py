"""Request and response bodies of the OpenAI API (field names, types and defaults as OpenAI has them)."""
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.params import MAX_STOP_TOKEN_IDS, SamplingParams

MAX_PROMPTS = 128  # prompts in one completion request
MAX_STOP = 4  # stop strings in one request, as OpenAI allows
MAX_MESSAGES = 2048  # messages in one chat request, as OpenAI allows; and parts in one message
MAX_CACHE_SALT_CHARS = 1024


class StrictModel(BaseModel):
    # Unknown fields are a 400 naming them, as OpenAI answers; and no coercion: OpenAI refuses "3" or true for a
    # number, and [true, false] or [1.0] for token ids (an int still passes for a float).
    model_config = ConfigDict(extra="forbid", strict=True)


# A list that stops at its first bad item: validating each of millions of items against every member of a union,
# and reporting each one, held the event loop for seconds.
FailFast = Field(fail_fast=True)
TokenIds = Annotated[list[int], FailFast]


class StreamOptions(StrictModel):
    include_usage: bool = False


# OpenAI parameters this server does not implement yet, with the values besides null that mean "not used".
NOT_YET_SUPPORTED = {"logprobs": (False,), "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "suffix": (),
                     "logit_bias": ({},), "presence_penalty": (0.0,), "frequency_penalty": (0.0,), "tools": ([],),
                     "tool_choice": ("none",), "functions": ([],), "function_call": (), "parallel_tool_calls": (),
                     "response_format": ({"type": "text"},)}


def _unused(value, unused_values: tuple) -> bool:
    """Null, or a value that leaves the parameter off, compared with its type: `logprobs: 0` asks for the sampled
    token's log-probability, and 0 == False."""
    return value is None or any(type(value) is type(unused) and value == unused for unused in unused_values)


class SamplingFields(StrictModel):
    """Fields both endpoints share: OpenAI's, then vLLM's extras."""
    model: str
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: int | None = Field(1, ge=1, description="choices per prompt, up to the server's --max-n")
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: Annotated[TokenIds, Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_CHARS,
                                   description="requests share cached prompt blocks only with the same salt")

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stop)}")
        return stop

    @model_validator(mode="after")
    def _check(self):
        used = [name for name, unused in NOT_YET_SUPPORTED.items()
                if name in type(self).model_fields and not _unused(getattr(self, name), unused)]
        if used:
            raise ValueError(f"not supported yet: {', '.join(used)}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(
            n=1 if self.n is None else self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens)


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], FailFast] | TokenIds | Annotated[list[TokenIds], FailFast]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_count(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the prompt is empty")
        if isinstance(prompt, list) and not isinstance(prompt[0], int) and len(prompt) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)]  # null only goes with tool calls
    name: str | None = None

    def for_template(self) -> dict:
        """The message as chat templates read it: text parts joined, and the speaker's name when it has one."""
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": self.role, "content": content, "name": self.name}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(StrictModel):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: TokenIds


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
