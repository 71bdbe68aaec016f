"""Sampling parameters, named as vLLM names them, validated when built."""
import json
import math
import operator
from dataclasses import dataclass, field

from engine.stop import StopPattern

# Temperatures below this sample greedily, as vLLM has it: the logits divided by them overflow float32.
GREEDY_BELOW = 1e-5
MAX_STOP_CHARS = 4096  # characters in one stop string
MAX_STOP_TOKEN_IDS = 1024  # ids in stop_token_ids
SEED_RANGE = (-2**63, 2**63)  # OpenAI's: a signed 64-bit integer (torch wraps larger ones onto negative ones)
PENALTY_RANGE = (-2.0, 2.0)  # presence_penalty and frequency_penalty, as OpenAI bounds them
BIAS_RANGE = (-100.0, 100.0)  # a logit_bias value, as OpenAI bounds it
MAX_BIASED_TOKENS = 1024  # entries in logit_bias
MAX_ALLOWED_TOKEN_IDS = 1 << 20  # ids in allowed_token_ids (a vocabulary's worth at most)
MAX_BAD_WORDS = 1024  # strings in bad_words
MAX_GRAMMAR_CHARS = 1 << 20  # characters in a schema, regex or grammar (a JSON schema as written)
MAX_CHOICES = 1024  # strings in a structured-output choice


class ParamError(ValueError):
    """A sampling parameter out of its range; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def is_whole(value) -> bool:
    """An int (numpy's too), not a bool or a float that happens to be whole."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool)


@dataclass(frozen=True)
class StructuredOutputs:
    """What the output must match, as vLLM's `structured_outputs` names it: exactly one of a JSON schema, any JSON
    object, a regular expression, one of some strings, or a grammar (Lark, or GBNF). JSON may have whitespace
    between its tokens, unless `disable_any_whitespace`, or as `whitespace_pattern` (a regex) says."""
    json: dict | str | None = None  # a JSON schema, as an object or its text
    json_object: bool = False  # any JSON object (OpenAI's response_format json_object)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None
    # What compiles to the same grammar: the kind, the spec as one text (a schema as canonical JSON), the JSON
    # options. Computed once: a large schema takes milliseconds to serialise.
    key: tuple[str, str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object is True else []
        for ok, message in self._checks(given):
            if not ok:
                raise ParamError("structured_outputs", message)
        object.__setattr__(self, "key", (given[0], self._text(), _canonical_json(self.json_options)))
        if len(self.key[1]) > MAX_GRAMMAR_CHARS:
            raise ParamError("structured_outputs", f"{given[0]} has more than {MAX_GRAMMAR_CHARS} characters")

    def _checks(self, given: list[str]):
        """(ok, message) for each rule, in order; a rule runs only if the ones before it passed."""
        yield len(given) == 1, ("structured_outputs takes exactly one of json, json_object, regex, choice and "
                                f"grammar; got {', '.join(given) or 'none'}")
        yield isinstance(self.json, (dict, str, type(None))), "json must be a JSON schema (an object, or its text)"
        for name in ("regex", "grammar", "whitespace_pattern"):
            value = getattr(self, name)
            yield value is None or (isinstance(value, str) and value), f"{name} must be a non-empty string"
        yield self.choice is None or (0 < len(self.choice) <= MAX_CHOICES and
                                      all(isinstance(c, str) and c for c in self.choice)), \
            f"choice must hold 1 to {MAX_CHOICES} non-empty strings"
        yield isinstance(self.json_object, bool) and isinstance(self.disable_any_whitespace, bool), \
            "json_object and disable_any_whitespace must be booleans"
        yield not self.json_options or given[0] in ("json", "json_object"), \
            "disable_any_whitespace and whitespace_pattern apply to json and json_object only"

    @property
    def json_options(self) -> dict:
        """llguidance's options for JSON, as the spec sets them."""
        if self.whitespace_pattern is not None:
            return {"whitespace_pattern": self.whitespace_pattern}
        return {"whitespace_flexible": False} if self.disable_any_whitespace else {}

    def _text(self) -> str:
        if self.json is not None:
            return self.json if isinstance(self.json, str) else _canonical_json(self.json)
        if self.choice is not None:
            return _canonical_json(self.choice)
        return "" if self.json_object else self.regex if self.regex is not None else self.grammar


def _canonical_json(value) -> str:
    try:
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ParamError("structured_outputs", f"the schema is not JSON: {exc}") from exc


@dataclass
class SamplingParams:
    n: int = 1  # choices: sequences that share the prompt's KV blocks, each with its own index (and seed + index)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context length; 0: only the prompt is computed
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    best_of: int | None = None  # candidates generated, of which the n with the highest cumulative logprob return
    logprobs: int | None = None  # per generated token: its log-probability and this many of the most likely
    prompt_logprobs: int | None = None  # the same for each prompt token after the first
    presence_penalty: float = 0.0  # subtracted from the logit of each token generated so far
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated so far
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of prompt and output tokens
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] | None = None  # never generated (their last token is barred after the rest of them)
    structured_outputs: StructuredOutputs | None = None  # the output is constrained token by token to match it
    # Built once here, not on the engine thread: the stop strings' match tables and the stop ids as a set.
    stop_patterns: tuple[StopPattern, ...] = field(init=False, repr=False, compare=False)
    stop_token_set: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        for param, ok, message in self._checks():
            if not ok:
                raise ParamError(param, message)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()} if self.logit_bias else None
        self.allowed_token_ids = None if self.allowed_token_ids is None else [int(t) for t in self.allowed_token_ids]
        self.bad_words = list(self.bad_words) if self.bad_words else None
        self.stop_token_set = frozenset(self.stop_token_ids)
        self.stop_patterns = tuple(StopPattern(s) for s in self.stop)

    def _checks(self):
        """(param, ok, message) for each rule, in order; a rule runs only if the ones before it passed."""
        finite = lambda value: isinstance(value, (int, float)) and math.isfinite(value)  # noqa: E731
        yield "n", is_whole(self.n) and self.n >= 1, f"n must be a whole number >= 1, got {self.n}"
        yield "temperature", finite(self.temperature) and self.temperature >= 0, \
            f"temperature must be a finite number >= 0, got {self.temperature}"
        yield "top_p", finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"
        yield "top_k", is_whole(self.top_k) and self.top_k >= 0, \
            f"top_k must be a whole number >= 1, or 0 or -1 for no limit, got {self.top_k}"
        yield "min_p", finite(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"
        # 0 computes the prompt and generates nothing: it scores a text (with prompt_logprobs).
        yield "max_tokens", self.max_tokens is None or (is_whole(self.max_tokens) and self.max_tokens >= 0), \
            f"max_tokens must be a whole number >= 0, got {self.max_tokens}"
        yield "min_tokens", is_whole(self.min_tokens) and self.min_tokens >= 0, \
            f"min_tokens must be a whole number >= 0, got {self.min_tokens}"
        yield "min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens, \
            f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
        yield "seed", self.seed is None or (is_whole(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]), \
            f"seed must be a whole number in [-2**63, 2**63 - 1], got {self.seed}"
        yield "stop", all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"
        yield "stop", all(len(s) <= MAX_STOP_CHARS for s in self.stop), \
            f"a stop string may have at most {MAX_STOP_CHARS} characters"
        yield "stop_token_ids", len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, \
            f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(self.stop_token_ids)}"
        yield "stop_token_ids", all(is_whole(t) and t >= 0 for t in self.stop_token_ids), \
            "stop_token_ids must be token ids (whole numbers >= 0)"
        yield from self._sampling_control_checks(finite)

    def _sampling_control_checks(self, finite):
        """The rules of best_of, logprobs, penalties, biases and token restrictions (token ids are checked against the
        vocabulary by the engine)."""
        yield "best_of", self.best_of is None or (is_whole(self.best_of) and self.best_of >= self.n), \
            f"best_of must be a whole number >= n ({self.n}), got {self.best_of}"
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            yield name, value is None or (is_whole(value) and value >= 0), \
                f"{name} must be a whole number >= 0, got {value}"
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            yield name, finite(value) and PENALTY_RANGE[0] <= value <= PENALTY_RANGE[1], \
                f"{name} must be in [{PENALTY_RANGE[0]:g}, {PENALTY_RANGE[1]:g}], got {value}"
        yield "repetition_penalty", finite(self.repetition_penalty) and self.repetition_penalty > 0, \
            f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}"
        bias = self.logit_bias or {}
        yield "logit_bias", len(bias) <= MAX_BIASED_TOKENS, f"at most {MAX_BIASED_TOKENS} logit_bias entries"
        yield "logit_bias", all(is_whole(t) and t >= 0 for t in bias), "logit_bias keys must be token ids"
        yield "logit_bias", all(finite(b) and BIAS_RANGE[0] <= b <= BIAS_RANGE[1] for b in bias.values()), \
            f"logit_bias values must be in [{BIAS_RANGE[0]:g}, {BIAS_RANGE[1]:g}]"
        allowed = self.allowed_token_ids
        yield "allowed_token_ids", allowed is None or 0 < len(allowed) <= MAX_ALLOWED_TOKEN_IDS, \
            f"allowed_token_ids must hold 1 to {MAX_ALLOWED_TOKEN_IDS} ids"
        yield "allowed_token_ids", allowed is None or all(is_whole(t) and t >= 0 for t in allowed), \
            "allowed_token_ids must be token ids (whole numbers >= 0)"
        words = self.bad_words or []
        yield "bad_words", len(words) <= MAX_BAD_WORDS, f"at most {MAX_BAD_WORDS} bad_words"
        yield "bad_words", all(isinstance(w, str) and w.strip() and len(w) <= MAX_STOP_CHARS for w in words), \
            f"bad_words must be non-blank strings of at most {MAX_STOP_CHARS} characters"
        yield "structured_outputs", isinstance(self.structured_outputs, (StructuredOutputs, type(None))), \
            "structured_outputs must be a StructuredOutputs"

    @property
    def num_candidates(self) -> int:
        """Sequences generated: best_of when it is set, else n."""
        return self.best_of or self.n

    @property
    def scored(self) -> bool:
        """Whether the output tokens' logprobs are computed: to return them, or to rank best_of candidates."""
        return self.logprobs is not None or self.num_candidates > self.n

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
