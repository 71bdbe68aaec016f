"""Token ids to text, one token at a time, with stop strings.

Decoding a token alone can drop a leading space (SentencePiece) or yield half a UTF-8 character
(byte-level and byte-fallback tokens), so each step decodes a short window of recent tokens and
emits only what it adds; text ending in U+FFFD waits for the rest of its character. Text that could
still become a stop string is held back until it cannot.
"""
from models.tokenizer import Tokenizer

_PROMPT_CONTEXT = 6  # prompt tokens decoded before the first output token, for its leading space


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: list[str],
                 skip_special_tokens: bool):
        self.tokenizer, self.stop, self.skip_special_tokens = tokenizer, stop, skip_special_tokens
        self._tokens = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset, self._read_offset = 0, len(self._tokens)
        self.text = ""  # all output text decoded so far (cut at a stop string once one matched)
        self.stop_string: str | None = None  # the stop string that matched
        self._partials = [_PartialMatch(stop) for stop in stop]

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int, match_stop: bool = True) -> None:
        """Decode one more token; `match_stop` is False while min_tokens forbids stopping."""
        self._tokens.append(token_id)
        new_text = self._pending_text()
        if new_text and not new_text.endswith("\ufffd"):
            self._append(new_text, match_stop)

    def flush(self) -> None:
        """At the end of a request, emit whatever is still pending, even an incomplete character."""
        if self.stop_string is None and (new_text := self._pending_text()):
            self._append(new_text, match_stop=True)

    def _pending_text(self) -> str:
        prefix = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset:])
        return full[len(prefix):] if len(full) > len(prefix) else ""

    def _append(self, new_text: str, match_stop: bool) -> None:
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        start = len(self.text)
        self.text += new_text
        for partial in self._partials:
            partial.feed(new_text)
        if not match_stop:
            return
        # A stop string may begin in text emitted by earlier tokens; the earliest match wins.
        matches = [(index, stop) for stop in self.stop
                   if (index := self.text.find(stop, max(0, start - len(stop) + 1))) != -1]
        if matches:
            index, self.stop_string = min(matches)
            self.text = self.text[:index]

    def visible_text(self, finished: bool) -> str:
        """The text that is safe to show: without a suffix that may still grow into a stop string."""
        if finished or not self.stop:
            return self.text
        hold = max(partial.length for partial in self._partials)
        return self.text[:len(self.text) - hold]


class _PartialMatch:
    """How much of the end of the text so far is the start of one stop string (`length`, short of all of it),
    kept up to date character by character in constant amortized time (Knuth-Morris-Pratt): checking every
    prefix of a long stop string against the text at each step cost time in the square of its length."""

    def __init__(self, stop: str):
        self.stop, self.length = stop, 0
        self.border = [0] * len(stop)  # border[i]: the longest proper prefix of stop[:i + 1] that also ends it
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.border[k - 1]
            k += stop[i] == stop[k]
            self.border[i] = k

    def feed(self, text: str) -> None:
        stop, border, k = self.stop, self.border, self.length
        for char in text:
            while k and stop[k] != char:
                k = border[k - 1]
            k += stop[k] == char
            if k == len(stop):  # a whole match (found and cut by the caller): what may grow is its border
                k = border[k - 1]
        self.length = k
