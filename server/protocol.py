"""Request and response bodies of the OpenAI API (field names, types and defaults as OpenAI has them)."""
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from engine.params import (MAX_ALLOWED_TOKEN_IDS, MAX_BAD_WORDS, MAX_BIASED_TOKENS, MAX_CHOICES, MAX_STOP_TOKEN_IDS,
                           ParamError, SamplingParams, StructuredOutputs)

MAX_PROMPTS = 128  # prompts in one completion request
MAX_STOP = 4  # stop strings in one request, as OpenAI allows
MAX_MESSAGES = 2048  # messages in one chat request, as OpenAI allows; and parts in one message
MAX_CACHE_SALT_CHARS = 1024
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI bounds it
MAX_TOOLS = 128  # functions in one request, as OpenAI allows
MAX_DOCUMENTS = 1024  # documents in one chat request
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function (and json_schema) names
TOKEN_ID_KEY = re.compile(r"[0-9]+")  # a logit_bias key: a token id written in ASCII digits, nothing around it


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


class JsonSchemaFormat(StrictModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # none: any JSON object
    strict: bool | None = None  # the output always follows the schema here


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_goes_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly when type is \"json_schema\"")
        return self

    def structured(self) -> StructuredOutputs | None:
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.json_schema else None
        return StructuredOutputs(json_object=True) if schema is None else StructuredOutputs(json=schema)


class StructuredOutputsField(StrictModel):
    """vLLM's `structured_outputs`: exactly one of these."""
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False  # JSON without whitespace between its tokens
    whitespace_pattern: str | None = None  # a regex of the whitespace JSON may have between its tokens

    def structured(self) -> StructuredOutputs:
        return StructuredOutputs(json=self.json_, json_object=bool(self.json_object), regex=self.regex,
                                 choice=self.choice, grammar=self.grammar,
                                 disable_any_whitespace=self.disable_any_whitespace,
                                 whitespace_pattern=self.whitespace_pattern)


# OpenAI parameters this server does not implement, with the values besides null that mean "not used". The
# functions API is deprecated in favour of tools.
NOT_YET_SUPPORTED = {"suffix": (), "functions": ([],), "function_call": ()}


def _unused(value, unused_values: tuple) -> bool:
    """Null, or a value that leaves the parameter off, compared with its type (0 == False, yet `false` is not 0)."""
    return value is None or any(type(value) is type(unused) and value == unused for unused in unused_values)


class SamplingFields(StrictModel):
    """Fields both endpoints share: OpenAI's, then vLLM's extras. A check across fields reads the ones validated
    before it (`info.data`): those declared earlier, a base class's first."""
    model: str
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: int | None = Field(1, ge=1, description="choices per prompt, up to the server's --max-n")
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_BIASED_TOKENS)] | None = Field(
        None, description="token id (a string) -> a bias in [-100, 100] added to its logit")
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: Annotated[TokenIds, Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_CHARS,
                                   description="requests share cached prompt blocks only with the same salt")
    repetition_penalty: float | None = Field(None, gt=0)
    allowed_token_ids: Annotated[TokenIds, Field(max_length=MAX_ALLOWED_TOKEN_IDS)] | None = None
    bad_words: Annotated[list[str], Field(max_length=MAX_BAD_WORDS)] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, description="per prompt token, up to the server's --max-logprobs")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stop)}")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias):
        if bad := [key for key in bias or () if not TOKEN_ID_KEY.fullmatch(key)]:
            raise ValueError(f"logit_bias keys must be token ids, such as \"50256\", got {bad[0]!r}")
        return bias

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs_not_streamed(cls, prompt_logprobs, info):
        if prompt_logprobs is not None and info.data.get("stream"):
            raise ValueError("prompt_logprobs cannot be used with stream")  # as vLLM answers
        return prompt_logprobs

    @model_validator(mode="after")
    def _check(self):
        used = [name for name, unused in NOT_YET_SUPPORTED.items()
                if name in type(self).model_fields and not _unused(getattr(self, name), unused)]
        if used:
            raise ValueError(f"not supported yet: {', '.join(used)}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.structured_outputs is not None and self.response_format not in (None, ResponseFormat(type="text")):
            raise ValueError("give at most one of response_format and structured_outputs")
        return self

    @property
    def constrains_output(self) -> bool:
        return self.structured_outputs is not None or self.response_format not in (None, ResponseFormat(type="text"))

    @property
    def structured_field(self) -> str:
        """The field the output's constraint came from, which its errors name."""
        return "structured_outputs" if self.structured_outputs is not None else "response_format"

    @property
    def shown_logprobs(self) -> int | None:
        """The most likely tokens shown beside each generated token's log-probability; None: none shown."""
        raise NotImplementedError

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        bias = None if self.logit_bias is None else {int(token): value for token, value in self.logit_bias.items()}
        return SamplingParams(
            n=1 if self.n is None else self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens, presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=bias, allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
            structured_outputs=self._structured(), **self._scoring())

    def _structured(self) -> StructuredOutputs | None:
        field = self.structured_outputs or self.response_format
        try:
            return field and field.structured()
        except ParamError as exc:
            raise ParamError(self.structured_field, str(exc)) from exc

    def _scoring(self) -> dict:
        """The engine's logprobs and prompt_logprobs (and best_of), which the endpoints ask for differently."""
        return {"logprobs": self.shown_logprobs, "prompt_logprobs": self.prompt_logprobs}


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], FailFast] | TokenIds | Annotated[list[TokenIds], FailFast]
    max_tokens: int | None = Field(16, ge=0, description="0 with echo scores the prompt without generating")
    logprobs: int | None = Field(None, ge=0, description="the most likely tokens shown per token (0: the chosen one "
                                                        "only), up to the server's --max-logprobs")
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of_not_streamed(cls, best_of, info):
        # The n best of the candidates are known only once all of them have finished.
        if best_of is not None and info.data.get("stream") and best_of > (info.data.get("n") or 1):
            raise ValueError("best_of cannot be used with stream")  # as OpenAI answers
        return best_of

    @property
    def shown_logprobs(self) -> int | None:
        return self.logprobs

    def _scoring(self) -> dict:
        # echo with logprobs shows the prompt's log-probabilities too: the engine computes as many as either asks
        asked = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return {"logprobs": self.logprobs, "prompt_logprobs": max(asked, default=None), "best_of": self.best_of}

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


class CalledFunction(StrictModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(StrictModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


Content = str | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)]


class _Message(StrictModel):
    """What every role's message has. Roles are separate models, as OpenAI's API has them, so that each role's
    required fields are in the OpenAPI schema and a missing one is a 400 naming it."""
    content: Content | None
    name: str | None = None

    @property
    def text(self) -> str | None:
        """The content, its text parts joined."""
        return self.content if self.content is None or isinstance(self.content, str) else \
            "".join(part.text for part in self.content)

    def for_template(self) -> dict:
        """The message as chat templates read it: text parts joined, and the speaker's name, an assistant's tool
        calls (arguments as text: `server/tools.py` makes them mappings) and the call a tool answers, when given."""
        calls = getattr(self, "tool_calls", None)
        return {"role": self.role, "content": self.text, "name": self.name,
                "tool_calls": None if calls is None else [call.model_dump() for call in calls],
                "tool_call_id": getattr(self, "tool_call_id", None)}


class TextMessage(_Message):
    """A system, developer or user message: text."""
    role: Literal["system", "developer", "user"]
    content: Content


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = None  # null when it only calls tools
    tool_calls: Annotated[list[ToolCall], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    # What the SDKs send back of an assistant message they received; nothing here is read.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None

    @model_validator(mode="after")
    def _says_or_calls(self):
        if self.content is None and self.tool_calls is None:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: str  # the call it answers


ChatMessage = Annotated[TextMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]
_MESSAGE = TypeAdapter(ChatMessage)


def chat_message(data: dict) -> TextMessage | AssistantMessage | ToolMessage:
    """A message of any role from its JSON form."""
    return _MESSAGE.validate_python(data)


class FunctionDefinition(StrictModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # the arguments always follow the schema when a call is forced

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, parameters):
        if parameters is not None and parameters.get("type", "object") != "object":
            raise ValueError("parameters must be the JSON schema of an object (type \"object\")")
        return parameters


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: ChosenFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    documents: Annotated[list[dict[str, str]], Field(max_length=MAX_DOCUMENTS)] | None = None  # vLLM's, for RAG
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top_logprobs, info):
        if top_logprobs is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs to be true")  # as OpenAI (and vLLM) answer
        return top_logprobs

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def shown_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


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
