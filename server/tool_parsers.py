"""Tool calls in model output: one parser per model family's format (named as vLLM's `--tool-call-parser`), plus
`forced`, the shape our grammar-constrained decoding produces for `tool_choice` "required" or a named function.

Every parser reads a message two ways: `parse` takes the whole text, `streamer` follows it as it is generated and
yields OpenAI's streaming deltas. `parse` is the streamer fed the whole text at once, and a streamer decides a
piece of text only once no continuation can change the decision, so both agree however the text is chunked.

A call's `arguments` is always the model's own JSON text of the arguments object with the whitespace between
tokens removed: compact like OpenAI's, faithful to what the model wrote (key order, number spelling, escapes), and
computable as the text arrives, which `forced` needs to stream arguments as they are generated.
"""
import json
import re
import uuid
from dataclasses import dataclass, replace
from typing import Callable


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


# --- JSON text: reading it as it arrives ---

# A reader is a generator over the growing text of a streamer (`src.text`): it yields while the text so far ends
# inside what it reads, raises _NotACall when the text cannot be that, and returns what it read. It keeps its place
# between feeds, so each character is scanned once however the text is chunked. (No reader holds the text in a local
# across a yield: ToolStreamer.feed grows it in place only while nothing else refers to it.)

_STRING = r'"[^"\\]*(?:\\.[^"\\]*)*"'
# A string's characters after its opening quote, up to its closing quote, the end of the text, or a final backslash.
_STRING_BODY = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.S)
# What JSON has outside strings but brackets: punctuation, literals (loosely: the decoder judges them), whitespace
# (JSON's four characters, not Unicode's).
_BETWEEN = re.compile(r"[:,\-+.0-9A-Za-z \t\n\r]*")
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_STRING_OR_WHITESPACE = re.compile(f"({_STRING})|[ \\t\\n\\r]+", re.S)


class _NotACall(Exception):
    """The text cannot be the expected form, whatever follows it."""


class _NeedMore(Exception):
    """The text ends inside what may still become the expected form."""


def _refuse(constant: str):
    """Python's decoder takes NaN and Infinity, which are not JSON (a client's parser would refuse the arguments)."""
    raise ValueError(constant)


_DECODER = json.JSONDecoder(parse_constant=_refuse)


def _skip_whitespace(text: str, pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()


def _next_token(src, pos: int):
    """Reader: where the next character but whitespace is."""
    while (pos := _skip_whitespace(src.text, pos)) == len(src.text):
        yield
    return pos


def _expect(src, pos: int, literal: str):
    """Reader: the position after `literal`, which must come next after whitespace."""
    pos = yield from _next_token(src, pos)
    while not src.text.startswith(literal, pos):
        if not literal.startswith(src.text[pos:pos + len(literal)]):
            raise _NotACall
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
            raise _NotACall
        elif not closers:
            return pos


def _read_json(src, pos: int, opener: str):
    """Reader: the JSON object or array (by its `opener`) that must come next after whitespace: (value, start, end)."""
    start = yield from _next_token(src, pos)
    if src.text[start] != opener:
        raise _NotACall
    end = yield from _container_end(src, start)
    try:
        return _DECODER.decode(src.text[start:end]), start, end
    except ValueError:
        raise _NotACall from None


def _value_end(text: str, start: int) -> int:
    """Where the (valid) JSON value at text[start] ends."""
    return _DECODER.raw_decode(text, start)[1]


def _member_spans(text: str, start: int) -> dict[str, tuple[int, int]]:
    """Each member's value's (start, end) in the valid JSON object at text[start]; a repeated key keeps its last
    value, as the decoder does."""
    spans, pos = {}, _skip_whitespace(text, start + 1)
    while text[pos] == '"':
        key, key_end = _DECODER.raw_decode(text, pos)
        value_start = _skip_whitespace(text, _skip_whitespace(text, key_end) + 1)  # past the ":"
        value_end = _value_end(text, value_start)
        spans[key] = (value_start, value_end)
        pos = _skip_whitespace(text, value_end)
        if text[pos] == ",":
            pos = _skip_whitespace(text, pos + 1)
    return spans


def _element_starts(text: str, start: int) -> list[int]:
    """Where each element begins in the valid JSON array at text[start]."""
    starts, pos = [], _skip_whitespace(text, start + 1)
    while text[pos] != "]":
        starts.append(pos)
        pos = _skip_whitespace(text, _value_end(text, pos))
        if text[pos] == ",":
            pos = _skip_whitespace(text, pos + 1)
    return starts


def _compact(json_text: str) -> str:
    """Valid JSON text without the whitespace between its tokens."""
    return _STRING_OR_WHITESPACE.sub(lambda m: m.group(1) or "", json_text)


def _call(obj: object, text: str, start: int, name_key: str, arguments_keys: tuple[str, ...]) -> tuple[str, str]:
    """(name, arguments) of a decoded call object whose text begins at text[start]."""
    if not isinstance(obj, dict) or not isinstance(obj.get(name_key), str):
        raise _NotACall
    key = next((k for k in arguments_keys if k in obj), None)
    if key is None or not isinstance(obj[key], dict):
        raise _NotACall
    value_start, value_end = _member_spans(text, start)[key]
    return obj[name_key], _compact(text[value_start:value_end])


def _resume(reader, final: bool):
    """Run a reader on the text so far: its result; _NeedMore while it waits for more, _NotACall if none will come."""
    try:
        next(reader)
    except StopIteration as done:
        return done.value
    raise _NotACall if final else _NeedMore


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
        # `self.text += text` would copy the whole text at every feed: CPython appends in place only to a string that
        # a local name alone refers to.
        whole, self.text = self.text, ""
        whole += text
        self.text = whole
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
                calls, end = _resume(self._block, final)
            except _NeedMore:
                return
            except _NotACall:
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
            except _NotACall:
                calls = None
            else:
                if not final:
                    return
            if calls is not None:  # the end, and the text is calls
                self._add_calls(calls)
                self.pos = len(self.text)
                return
            self._is_content = True
        self._content_until(len(self.text))


# --- hermes: <tool_call>{"name": ..., "arguments": {...}}</tool_call> ---

_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"


def _read_hermes_block(src, start: int):
    obj, begin, end = yield from _read_json(src, start + len(_HERMES_OPEN), "{")
    call = _call(obj, src.text, begin, "name", ("arguments", "parameters"))
    return [call], (yield from _expect(src, end, _HERMES_CLOSE))


# --- llama3_json: the message is {"name": ..., "parameters": {...}}, optionally after <|python_tag|>, ";"-separated ---

_PYTHON_TAG = "<|python_tag|>"


def _read_llama3_calls(src):
    """Reader that never returns: yields the calls when the text so far is calls, None while it ends inside one."""
    try:
        pos = yield from _expect(src, 0, _PYTHON_TAG)
    except _NotACall:
        pos = 0
    calls = []
    while True:
        obj, begin, end = yield from _read_json(src, pos, "{")
        calls.append(_call(obj, src.text, begin, "name", ("parameters", "arguments")))
        pos = _skip_whitespace(src.text, end)
        while pos == len(src.text):  # calls so far; more may follow, or text that makes it all content
            yield calls
            pos = _skip_whitespace(src.text, pos)
        if src.text[pos] != ";":
            raise _NotACall
        pos += 1


# --- command-r: Action: ```json [{"tool_name": ..., "parameters": {...}}, ...] ``` ---

_ACTION = "Action:"
# "No tool": the template tells the model to use `directly-answer`; Cohere's tool itself is `directly_answer`.
_DIRECTLY_ANSWER = ("directly_answer", "directly-answer")


def _read_action_block(src, start: int):
    fence = yield from _expect(src, start + len(_ACTION), "```json")
    items, begin, end = yield from _read_json(src, fence, "[")
    calls = [_call(item, src.text, item_start, "tool_name", ("parameters",))
             for item, item_start in zip(items, _element_starts(src.text, begin))]
    return [call for call in calls if call[0] not in _DIRECTLY_ANSWER], (yield from _expect(src, end, "```"))


# --- forced: grammar-constrained output for tool_choice "required" or a named function ---

# The grammar (llguidance) writes an object's properties in the schema's order and allows whitespace between tokens.
# A `required` output is [{"name": <name>, "parameters": <arguments>}, ...]; a named function's, its arguments.


class _ObjectCursor:
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
            except _NotACall:
                self._derailed = True
            else:  # at the end, a step begun but unfinished (a name or punctuation cut short) leaves the shape
                self._derailed = final and _skip_whitespace(self.text, self.pos) < len(self.text)
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
                name = yield from self._read_name()
                yield from self._read_literals(",", '"parameters"', ":")
                yield from self._read_arguments(name)
                yield from self._read_literals("}")
                after = yield from _next_token(self, self.pos)
                if self.text[after] not in ",]":
                    raise _NotACall
                self.pos = after + 1
                if self.text[after] == "]":
                    break
        yield from _next_token(self, self.pos)
        raise _NotACall

    def _read_literals(self, *literals: str):
        for literal in literals:
            self.pos = yield from _expect(self, self.pos, literal)

    def _read_name(self):
        start = yield from _next_token(self, self.pos)
        if self.text[start] != '"':
            raise _NotACall
        end = yield from _string_end(self, start)
        try:
            name = _DECODER.decode(self.text[start:end])
        except ValueError:  # a bad escape
            raise _NotACall from None
        self.pos = end
        return name

    def _read_arguments(self, name: str):
        """Stream the arguments object of a call to `name`, which must come next."""
        start = yield from _next_token(self, self.pos)
        if self.text[start] != "{":
            raise _NotACall
        self._start_call(name)
        cursor, self.pos = _ObjectCursor(), start
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
        return _BlockStreamer(_ACTION, _read_action_block)


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


# --- Choosing a format, and what the model is told ---

# A Jinja tag ({{ }} or {% %}) with the string literals in it, which may hold "}}" or "%}".
_JINJA_STRING = r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\""""
_JINJA_TAG = re.compile(r"\{[{%]((?:" + _JINJA_STRING + r"|[^'\"])*?)[%}]\}", re.S)


def parser_for_template(template: str | None) -> str:
    """The format a chat template's model writes its calls in; "hermes" (ours, with tools_system_prompt) when the
    template shows none."""
    if template is None:
        return "hermes"
    if _ACTION in template and "tool_name" in template:
        return "command-r"
    if _PYTHON_TAG in template or ("<|start_header_id|>" in template
                                   and ("ipython" in template or '"parameters"' in template)):
        return "llama3_json"
    return "hermes"


def template_knows_tools(template: str | None) -> bool:
    """Whether the template's code reads the `tools` variable (words in its text do not count): if not, the
    request's tools reach the model only through tools_system_prompt."""
    if template is None:
        return False
    return any(re.search(r"\btools\b", re.sub(_JINJA_STRING, "", tag.group(1)))
               for tag in _JINJA_TAG.finditer(template))


def tools_system_prompt(tools: list[dict]) -> str:
    """A system message that describes OpenAI-style tools to a model whose template knows none, asking for calls
    in the hermes format."""
    signatures = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    return ("You can call functions to help you answer. Each function is described by its JSON signature:\n"
            f"<tools>\n{signatures}\n</tools>\n\n"
            "To call a function, write a JSON object with its name and arguments inside <tool_call></tool_call> "
            "tags:\n"
            '<tool_call>\n{"name": <function name>, "arguments": <arguments object>}\n</tool_call>\n'
            "For several calls, write one block per call. If no function is needed, answer directly, without "
            "<tool_call> tags.")


def forced_schema(tools: list[dict], function_name: str | None, parallel: bool) -> dict:
    """The JSON schema that grammar-constrained decoding holds the output to when `tool_choice` names a function
    (`function_name`, one of the tools') or is "required" (None): what forced_parser(function_name) reads."""
    functions = [tool["function"] for tool in tools]
    if function_name is not None:
        return next(_parameters(f) for f in functions if f["name"] == function_name)
    calls = [{"type": "object",
              "properties": {"name": {"const": f["name"]}, "parameters": _parameters(f)},
              "required": ["name", "parameters"], "additionalProperties": False} for f in functions]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _parameters(function: dict) -> dict:
    return function.get("parameters") or {"type": "object"}
