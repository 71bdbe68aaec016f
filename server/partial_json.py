"""JSON text read as it arrives: what the tool-call parsers (`server/tool_parsers.py`) use to find where a JSON value
ends in a model's growing output, decode it, and keep the model's own text of it without the whitespace between
tokens.

A reader is a generator over the growing text of a source (`src.text`, e.g. a ToolStreamer): it yields while the
text so far ends inside what it reads, raises NotACall when the text cannot be that, and returns what it read. It
keeps its place between feeds, so each character is scanned once however the text is chunked.
"""
import json
import re

_STRING = r'"[^"\\]*(?:\\.[^"\\]*)*"'
# A string's characters after its opening quote, up to its closing quote, the end of the text, or a final backslash.
_STRING_BODY = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.S)
# What JSON has outside strings but brackets: punctuation, literals (loosely: the decoder judges them), whitespace
# (JSON's four characters, not Unicode's).
_BETWEEN = re.compile(r"[:,\-+.0-9A-Za-z \t\n\r]*")
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_STRING_OR_WHITESPACE = re.compile(f"({_STRING})|[ \\t\\n\\r]+", re.S)


class NotACall(Exception):
    """The text cannot be the expected form, whatever follows it."""


class NeedMore(Exception):
    """The text ends inside what may still become the expected form."""


def _refuse(constant: str):
    """Python's decoder takes NaN and Infinity, which are not JSON (a client's parser would refuse the arguments)."""
    raise ValueError(constant)


_DECODER = json.JSONDecoder(parse_constant=_refuse)


def skip_whitespace(text: str, pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()


def next_token(src, pos: int):
    """Reader: where the next character but whitespace is."""
    while (pos := skip_whitespace(src.text, pos)) == len(src.text):
        yield
    return pos


def expect(src, pos: int, literal: str):
    """Reader: the position after `literal`, which must come next after whitespace."""
    pos = yield from next_token(src, pos)
    while not src.text.startswith(literal, pos):
        if not literal.startswith(src.text[pos:pos + len(literal)]):
            raise NotACall
        yield
    return pos + len(literal)


def _string_end(src, start: int):
    """Reader: the position just past the JSON string that opens at src.text[start]."""
    pos = start + 1
    while True:
        pos = _STRING_BODY.match(src.text, pos).end()
        if src.text[pos:pos + 1] == '"':
            return pos + 1
        yield


def _container_end(src, start: int):
    """Reader: the position just past the JSON object or array that opens at src.text[start]."""
    closers, pos = [], start
    while True:
        pos = _BETWEEN.match(src.text, pos).end()
        if pos == len(src.text):
            yield
            continue
        char = src.text[pos]
        if char == '"':
            pos = yield from _string_end(src, pos)
            continue
        pos += 1
        if char in "{[":
            closers.append("}" if char == "{" else "]")
        elif char not in "}]" or char != closers.pop():  # a character no JSON has outside strings, or a mismatch
            raise NotACall
        elif not closers:
            return pos


def read_string(src, pos: int):
    """Reader: the JSON string that must come next after whitespace: (value, end)."""
    start = yield from next_token(src, pos)
    if src.text[start] != '"':
        raise NotACall
    end = yield from _string_end(src, start)
    try:
        return _DECODER.decode(src.text[start:end]), end
    except ValueError:  # a bad escape or a raw control character
        raise NotACall from None


def read_json(src, pos: int, opener: str):
    """Reader: the JSON object or array (by its `opener`) that must come next after whitespace: (value, start, end)."""
    start = yield from next_token(src, pos)
    if src.text[start] != opener:
        raise NotACall
    end = yield from _container_end(src, start)
    try:
        return _DECODER.decode(src.text[start:end]), start, end
    except ValueError:
        raise NotACall from None


def resume(reader, final: bool):
    """Run a reader on the text so far: its result; NeedMore while it waits for more, NotACall if none will come."""
    try:
        next(reader)
    except StopIteration as done:
        return done.value
    raise NotACall if final else NeedMore


def _value_end(text: str, start: int) -> int:
    """Where the (valid) JSON value at text[start] ends."""
    return _DECODER.raw_decode(text, start)[1]


def member_spans(text: str, start: int) -> dict[str, tuple[int, int]]:
    """Each member's value's (start, end) in the valid JSON object at text[start]; a repeated key keeps its last
    value, as the decoder does."""
    spans, pos = {}, skip_whitespace(text, start + 1)
    while text[pos] == '"':
        key, key_end = _DECODER.raw_decode(text, pos)
        value_start = skip_whitespace(text, skip_whitespace(text, key_end) + 1)  # past the ":"
        value_end = _value_end(text, value_start)
        spans[key] = (value_start, value_end)
        pos = skip_whitespace(text, value_end)
        if text[pos] == ",":
            pos = skip_whitespace(text, pos + 1)
    return spans


def element_starts(text: str, start: int) -> list[int]:
    """Where each element begins in the valid JSON array at text[start]."""
    starts, pos = [], skip_whitespace(text, start + 1)
    while text[pos] != "]":
        starts.append(pos)
        pos = skip_whitespace(text, _value_end(text, pos))
        if text[pos] == ",":
            pos = skip_whitespace(text, pos + 1)
    return starts


def compact(json_text: str) -> str:
    """Valid JSON text without the whitespace between its tokens."""
    return _STRING_OR_WHITESPACE.sub(lambda m: m.group(1) or "", json_text)


class ObjectCursor:
    """Follows one JSON object character by character as it arrives: where it ends, and its text without the
    whitespace between tokens."""

    def __init__(self):
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.done = False

    def take(self, text: str, pos: int) -> tuple[str, int]:
        """The object's compacted text from text[pos:] and the position after what was read."""
        kept = []
        while pos < len(text) and not self.done:
            char = text[pos]
            pos += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char in " \t\n\r":
                continue
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                self.done = self.depth == 0
            kept.append(char)
        return "".join(kept), pos
