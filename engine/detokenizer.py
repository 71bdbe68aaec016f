"""Token ids to text, one token at a time, with stop strings.

Decoding a token alone can drop a leading space (SentencePiece) or yield half a UTF-8 character
(byte-level and byte-fallback tokens), so each step decodes a short window of recent tokens and
emits only what it adds; text ending in U+FFFD waits for the rest of its character. Text that could
still become a stop string is held back until it cannot.

A character whose UTF-8 bytes begin in the prompt's last tokens and end in the output's first ones (a token-id
prompt cut inside a character) is output text: the prompt's decoded text shows U+FFFD for its first part, the
output's the whole character.
"""
from engine.stop import StopPattern
from models.tokenizer import Tokenizer

_PROMPT_CONTEXT = 6  # prompt tokens decoded before the first output token, for its leading space
_MAX_CHAR_TOKENS = 3  # the most tokens a character's first bytes can fill: a UTF-8 character has at most 4 bytes


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop_patterns: tuple[StopPattern, ...],
                 skip_special_tokens: bool):
        self.tokenizer, self.stop_patterns, self.skip_special_tokens = tokenizer, stop_patterns, skip_special_tokens
        self._tokens = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset, self._read_offset = 0, self._complete_prefix(self._tokens)
        self.text = ""  # all output text decoded so far (cut at a stop string once one matched)
        self.stop_string: str | None = None  # the stop string that matched
        self._matched = [0] * len(stop_patterns)  # how much of each stop string the text ends with

    def _complete_prefix(self, tokens: list[int]) -> int:
        """How many of the prompt's tokens decode to whole characters: the rest begin one that the output ends."""
        end = len(tokens)
        while end > max(0, len(tokens) - _MAX_CHAR_TOKENS) and self._decode(tokens[:end]).endswith("\ufffd"):
            end -= 1
        return end if not self._decode(tokens[:end]).endswith("\ufffd") else len(tokens)

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
        self._matched = [pattern.advance(k, new_text) for pattern, k in zip(self.stop_patterns, self._matched)]
        if not match_stop:
            return
        # A stop string may begin in text emitted by earlier tokens; the earliest match wins.
        matches = [(index, stop) for stop in (pattern.stop for pattern in self.stop_patterns)
                   if (index := self.text.find(stop, max(0, start - len(stop) + 1))) != -1]
        if matches:
            index, self.stop_string = min(matches)
            self.text = self.text[:index]

    def visible_text(self, finished: bool) -> str:
        """The text that is safe to show: without a suffix that may still grow into a stop string."""
        if finished or not self.stop_patterns:
            return self.text
        return self.text[:len(self.text) - max(self._matched)]

