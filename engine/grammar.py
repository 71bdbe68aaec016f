"""Structured outputs: each constrained sequence holds an llguidance matcher, which says after each token which
tokens may come next. Specs compile once into a matcher (cached by spec); each sequence runs a copy of it."""
import json
import threading
from collections import OrderedDict

import llguidance
import torch
from llguidance.gbnf_to_lark import any_to_lark
from llguidance.torch import fill_next_token_bitmask

from engine.params import StructuredOutputs
from models.tokenizer import Tokenizer

CACHED_GRAMMARS = 256  # compiled specs kept, least recently used dropped first
_BYTE_BITS = (1 << torch.arange(8)).to(torch.uint8)  # each bit of a byte, lowest first: the library's token order


class GrammarError(ValueError):
    """A spec the library cannot compile: the client's fault."""


class Grammars:
    """Compiles specs into matchers for one vocabulary. Thread-safe: the server compiles on its worker threads, so
    that the engine thread finds each spec compiled."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._lock = threading.Lock()
        self._llg_tokenizer: llguidance.LLTokenizer | None = None  # built on first use: it takes a quarter second
        self._compiled: OrderedDict[tuple[str, str, str], llguidance.LLMatcher] = OrderedDict()

    def compile(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        """The spec's matcher in its start state (the cache's own: copy it to run it); GrammarError if it is not one
        the library can compile."""
        with self._lock:
            if (matcher := self._compiled.get(spec.key)) is not None:
                self._compiled.move_to_end(spec.key)
                return matcher
        # Outside the lock: a large schema compiles for tens of milliseconds, and other specs need not wait.
        matcher = llguidance.LLMatcher(self._vocabulary(), _grammar(spec), log_level=0)
        # The first mask, computed here on the caller's thread, finds what the library refuses only once it runs (a
        # lexer too complex for its limits), and warms the matcher.
        first = matcher.deep_copy()
        fill_next_token_bitmask(first, _bitmask(1, self._vocab_size))
        if matcher.is_error() or first.is_error():
            raise GrammarError(f"the {spec.key[0]} cannot be compiled: {matcher.get_error() or first.get_error()}")
        with self._lock:
            self._compiled[spec.key] = matcher
            if len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return matcher

    def matchers(self, spec: StructuredOutputs, count: int) -> list[llguidance.LLMatcher]:
        """A new request's sequences' own matchers."""
        compiled = self.compile(spec)
        return [compiled.deep_copy() for _ in range(count)]

    def _vocabulary(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._llg_tokenizer is None:
                tok = self._tokenizer
                # n_vocab: the model's logits may have more rows than the tokenizer has tokens; those are never allowed.
                self._llg_tokenizer = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=self._vocab_size,
                                                             eos_token=list(tok.eos_token_ids))
            return self._llg_tokenizer


def _grammar(spec: StructuredOutputs) -> str:
    """The spec as an llguidance grammar."""
    try:
        if spec.json is not None or spec.json_object:
            schema = {"type": "object"} if spec.json_object else spec.json
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=spec.json_options or None)
        if spec.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        if spec.choice is not None:  # Lark string literals take JSON's escapes
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice))
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(spec.grammar))
    except Exception as exc:  # noqa: BLE001 - a schema that is not JSON; a GBNF grammar the converter refuses, which
        # it says with exceptions of several kinds (its own, Exception, IndexError): all the client's 400
        raise GrammarError(f"the {spec.key[0]} cannot be compiled: {exc}") from exc


def mask_rows(logits: torch.Tensor, rows: list[int], matchers: list[llguidance.LLMatcher]) -> None:
    """Bar in each constrained row of a step's logits the tokens its grammar does not allow next. The masks are
    computed one row after the other on this thread, a few microseconds a row: with the library's thread pool the
    sampler took 7.1-7.6% of a 64-sequence step's time, one row after the other 5.8-6.1% (2 cores)."""
    vocab = logits.shape[1]
    bitmask = _bitmask(len(rows), vocab)
    for i, matcher in enumerate(matchers):
        fill_next_token_bitmask(matcher, bitmask, i)
    # Unpacked a byte at a time (a token's bit is bit t % 8 of byte t // 8 on a little-endian CPU): 3 MB of bytes
    # for 64 rows of a 49,152-token vocabulary, where unpacking the 32-bit words wrote 12 MB twice.
    barred = (bitmask.view(torch.uint8)[:, :, None] & _BYTE_BITS).view(len(rows), -1)[:, :vocab] == 0
    barred = barred.to(logits.device)
    if rows == list(range(logits.shape[0])):  # every row constrained: in place, without copying the rows
        logits.masked_fill_(barred, float("-inf"))
    else:
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(barred, float("-inf"))


def _bitmask(rows: int, vocab: int) -> torch.Tensor:
    """Room for the library's masks: a bit a token, 32 to a word."""
    return torch.zeros(rows, (vocab + 31) // 32, dtype=torch.int32)


def advance(matcher: llguidance.LLMatcher, token: int) -> bool:
    """Feed the sampled token to the sequence's matcher; whether the grammar is complete and allows nothing more."""
    if not matcher.consume_token(token):
        raise GrammarError(f"token {token} does not continue the grammar: {matcher.get_error()}")
    return matcher.is_stopped()
