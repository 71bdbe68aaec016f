"""Tool calls in model output: one parser per model family's format (named as vLLM's `--tool-call-parser`), plus
`forced`, the shape our grammar-constrained decoding produces for `tool_choice` "required" or a named function.

Every parser reads a message two ways: `parse` takes the whole text, `streamer` follows it as it is generated and
yields OpenAI's streaming deltas. `parse` is the streamer fed the whole text at once, and a streamer decides a
piece of text only once no continuation can change the decision, so both agree however the text is chunked.

A call's `arguments` is always the model's own JSON text of the arguments object with the whitespace between
tokens removed: compact like OpenAI's, faithful to what the model wrote (key order, number spelling, escapes), and
computable as the text arrives, which `forced` needs to stream arguments as they are generated.
"""
import uuid
from dataclasses import dataclass, replace
from typing import Callable

from server.partial_json import (NeedMore, NotACall, ObjectCursor, compact, element_starts, expect, member_spans,
                                 next_token, read_json, read_string, resume, skip_whitespace)


@dataclass(frozen=True)
class ToolCall:
    id: str  # "call_" + 24 random [a-zA-Z0-9] characters
    name: str
    arguments: str  # a JSON text (an object)


@dataclass(frozen=True)
class Parsed:
    content: str | None  # text outside the calls; None when there is none but whitespace
    calls: list[ToolCall]


@dataclass(frozen=True)
class CallDelta:
    """One entry of OpenAI's streaming `delta.tool_calls`."""
    index: int  # the call's position in the message
    id: str | None = None  # set only on a call's first delta, with the name
    name: str | None = None
    arguments: str = ""  # a fragment


@dataclass(frozen=True)
class StreamDelta:
    content: str = ""
    calls: tuple[CallDelta, ...] = ()


# --- Streaming ---

class ToolStreamer:
    """Follows one message as it is generated. Subclasses implement `_advance`, which decides as much of the text
    after `self.pos` as no continuation can change, through `_content_until`, `_start_call` and `_add_arguments`."""

    def __init__(self):
        self.text = ""  # everything fed so far
        self.pos = 0  # the text before it is decided
        self._blank = ""  # leading whitespace, held until the content shows it is not blank (parse would say None)
        self._content: list[str] = []
        self._calls: list[CallDelta] = []
        self._call_count = 0

    def feed(self, text: str) -> StreamDelta:
        """`text`: the new text since the last feed."""
        self.text += text
        self._advance(final=False)
        return self._take()

    def finish(self) -> StreamDelta:
        """The text is complete: decide what was held back."""
        self._advance(final=True)
        return self._take()

    def _advance(self, final: bool) -> None:
        raise NotImplementedError

    def _content_until(self, end: int) -> None:
        """Release text[pos:end] as content."""
        piece, self.pos = self.text[self.pos:end], end
        if self._blank is not None:
            self._blank += piece
            if not self._blank.strip():
                return
            piece, self._blank = self._blank, None
        if piece:
            self._content.append(piece)

    def _start_call(self, name: str) -> None:
        self._calls.append(CallDelta(self._call_count, id=_new_call_id(), name=name))
        self._call_count += 1

    def _add_arguments(self, fragment: str) -> None:
        """More of the current call's arguments."""
        if not fragment:
            return
        index = self._call_count - 1
        if self._calls and self._calls[-1].index == index:  # the call already has a delta in this step: extend it
            self._calls[-1] = replace(self._calls[-1], arguments=self._calls[-1].arguments + fragment)
        else:
            self._calls.append(CallDelta(index, arguments=fragment))

    def _add_calls(self, calls: list[tuple[str, str]]) -> None:
        """Whole calls: (name, arguments) each."""
        for name, arguments in calls:
            self._start_call(name)
            self._add_arguments(arguments)

    def _take(self) -> StreamDelta:
        delta = StreamDelta("".join(self._content), tuple(self._calls))
        self._content, self._calls = [], []
        return delta


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _partial_marker(text: str, pos: int, marker: str) -> int:
    """The length of the longest end of text[pos:] that begins `marker` (text that may yet become it)."""
    for length in range(min(len(marker) - 1, len(text) - pos), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


class _BlockStreamer(ToolStreamer):
    """Content with blocks of calls, each opened by a marker: content streams at once but for a possible start of
    the marker; a block is held until it is complete, then released as calls, or as content if it is no block."""

    def __init__(self, marker: str, read_block: Callable):
        super().__init__()
        self._marker, self._read_block = marker, read_block  # read_block(src, start): reader of (calls, end)
        self._block = None  # the reader of the block at self.pos while it is open

    def _advance(self, final: bool) -> None:
        while True:
            if self._block is None:
                start = self.text.find(self._marker, self.pos)
                if start == -1:
                    held = 0 if final else _partial_marker(self.text, self.pos, self._marker)
                    self._content_until(len(self.text) - held)
                    return
                self._content_until(start)
                self._block = self._read_block(self, start)
            try:
                calls, end = resume(self._block, final)
            except NeedMore:
                return
            except NotACall:
                self._content_until(self.pos + len(self._marker))  # the marker is text; look for the next one
            else:
                self._add_calls(calls)
                self.pos = end
            self._block = None


class _Llama3JsonStreamer(ToolStreamer):
    """The whole message is calls or content, so calls are known only at its end; a message that cannot be calls
    streams as content from the moment that shows."""

    def __init__(self):
        super().__init__()
        self._reader = _read_llama3_calls(self)
        self._is_content = False

    def _advance(self, final: bool) -> None:
        if not self._is_content:
            try:
                calls = next(self._reader)
            except NotACall:
                self._is_content = True
            else:
                if not final:
                    return
                if calls is not None:
                    self._add_calls(calls)
                    self.pos = len(self.text)
                    return
                self._is_content = True  # the text ends inside a call
        self._content_until(len(self.text))


# --- The formats' calls, read as JSON text (readers: server/partial_json.py) ---

def _call(obj: object, text: str, start: int, name_key: str, arguments_keys: tuple[str, ...]) -> tuple[str, str]:
    """(name, arguments) of a decoded call object whose text begins at text[start]."""
    if not isinstance(obj, dict) or not isinstance(obj.get(name_key), str):
        raise NotACall
    key = next((k for k in arguments_keys if k in obj), None)
    if key is None or not isinstance(obj[key], dict):
        raise NotACall
    value_start, value_end = member_spans(text, start)[key]
    return obj[name_key], compact(text[value_start:value_end])


# --- hermes: <tool_call>{"name": ..., "arguments": {...}}</tool_call> ---

_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"


def _read_hermes_block(src, start: int):
    obj, begin, end = yield from read_json(src, start + len(_HERMES_OPEN), "{")
    call = _call(obj, src.text, begin, "name", ("arguments", "parameters"))
    return [call], (yield from expect(src, end, _HERMES_CLOSE))


# --- llama3_json: the message is {"name": ..., "parameters": {...}}, optionally after <|python_tag|>, ";"-separated ---

PYTHON_TAG = "<|python_tag|>"


def _read_llama3_calls(src):
    """Reader that never returns: yields the calls when the text so far is calls, None while it ends inside one."""
    try:
        pos = yield from expect(src, 0, PYTHON_TAG)
    except NotACall:
        pos = 0
    calls = []
    while True:
        obj, begin, end = yield from read_json(src, pos, "{")
        calls.append(_call(obj, src.text, begin, "name", ("parameters", "arguments")))
        pos = skip_whitespace(src.text, end)
        while pos == len(src.text):  # calls so far; more may follow, or text that makes it all content
            yield calls
            pos = skip_whitespace(src.text, pos)
        if src.text[pos] != ";":
            raise NotACall
        pos += 1


# --- command-r: Action: ```json [{"tool_name": ..., "parameters": {...}}, ...] ``` ---

ACTION = "Action:"
# "No tool": the template tells the model to use `directly-answer`; Cohere's tool itself is `directly_answer`.
_DIRECTLY_ANSWER = ("directly_answer", "directly-answer")


def _read_action_block(src, start: int):
    fence = yield from expect(src, start + len(ACTION), "```json")
    items, begin, end = yield from read_json(src, fence, "[")
    calls = [_call(item, src.text, item_start, "tool_name", ("parameters",))
             for item, item_start in zip(items, element_starts(src.text, begin))]
    return [call for call in calls if call[0] not in _DIRECTLY_ANSWER], (yield from expect(src, end, "```"))


# --- forced: grammar-constrained output for tool_choice "required" or a named function ---

# The grammar (llguidance) writes an object's properties in the schema's order and allows whitespace between tokens.
# A `required` output is [{"name": <name>, "parameters": <arguments>}, ...]; a named function's, its arguments.


class _ForcedStreamer(ToolStreamer):
    """Follows the output's expected shape step by step and streams each call's arguments as they arrive. The
    grammar makes the shape certain; an output cut short (max_tokens) leaves the last call's arguments cut short.
    Text that leaves the shape (none, under the grammar) is content from there on. `self.pos` moves past each step
    as it is read."""

    def __init__(self, function_name: str | None):
        super().__init__()
        self._reader = self._read_output(function_name)
        self._derailed = False

    def _advance(self, final: bool) -> None:
        if not self._derailed:
            try:
                next(self._reader)
            except NotACall:
                self._derailed = True
            else:  # at the end, a step begun but unfinished (a name or punctuation cut short) leaves the shape
                self._derailed = final and skip_whitespace(self.text, self.pos) < len(self.text)
        if self._derailed:
            self._content_until(len(self.text))

    def _read_output(self, function_name: str | None):
        """Reader that never returns: the named function's arguments, or (None) the `required` array of calls;
        then nothing but whitespace."""
        if function_name is not None:
            yield from self._read_arguments(function_name)
        else:
            yield from self._read_literals("[")
            while True:
                yield from self._read_literals("{", '"name"', ":")
                name, self.pos = yield from read_string(self, self.pos)
                yield from self._read_literals(",", '"parameters"', ":")
                yield from self._read_arguments(name)
                yield from self._read_literals("}")
                after = yield from next_token(self, self.pos)
                if self.text[after] not in ",]":
                    raise NotACall
                self.pos = after + 1
                if self.text[after] == "]":
                    break
        yield from next_token(self, self.pos)
        raise NotACall

    def _read_literals(self, *literals: str):
        for literal in literals:
            self.pos = yield from expect(self, self.pos, literal)

    def _read_arguments(self, name: str):
        """Stream the arguments object of a call to `name`, which must come next."""
        start = yield from next_token(self, self.pos)
        if self.text[start] != "{":
            raise NotACall
        self._start_call(name)
        cursor, self.pos = ObjectCursor(), start
        while True:
            fragment, self.pos = cursor.take(self.text, self.pos)
            self._add_arguments(fragment)
            if cursor.done:
                return
            yield


# --- Parsers ---

class ToolParser:
    """A format of tool calls in a message."""

    def streamer(self) -> ToolStreamer:
        raise NotImplementedError

    def parse(self, text: str) -> Parsed:
        streamer = self.streamer()
        return _assemble([streamer.feed(text), streamer.finish()])


class HermesParser(ToolParser):
    def streamer(self) -> ToolStreamer:
        return _BlockStreamer(_HERMES_OPEN, _read_hermes_block)


class Llama3JsonParser(ToolParser):
    def streamer(self) -> ToolStreamer:
        return _Llama3JsonStreamer()


class CommandRParser(ToolParser):
    def streamer(self) -> ToolStreamer:
        return _BlockStreamer(ACTION, _read_action_block)


class ForcedParser(ToolParser):
    def __init__(self, function_name: str | None):
        self.function_name = function_name

    def streamer(self) -> ToolStreamer:
        return _ForcedStreamer(self.function_name)


PARSERS: dict[str, Callable[..., ToolParser]] = {
    "hermes": HermesParser, "llama3_json": Llama3JsonParser, "command-r": CommandRParser}


def forced_parser(function_name: str | None) -> ToolParser:
    """The parser of grammar-constrained output: the arguments object of the named function, or (None) the
    `required` array of calls."""
    return ForcedParser(function_name)


def _assemble(deltas: list[StreamDelta]) -> Parsed:
    content = "".join(delta.content for delta in deltas)
    calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
    for call in (call for delta in deltas for call in delta.calls):
        if call.index not in calls:
            calls[call.index] = [call.id, call.name, ""]
        calls[call.index][2] += call.arguments
    # A streamer releases no content that is only whitespace: "" is the None case.
    return Parsed(content or None, [ToolCall(*calls[index]) for index in sorted(calls)])
