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


# --- JSON text: finding where values end without parsing them ---

_STRING = r'"[^"\\]*(?:\\.[^"\\]*)*"'
_STRING_TOKEN = re.compile(_STRING, re.S)
# JSON's tokens, literals loosely (json.loads judges them); whitespace is JSON's four characters, not Unicode's.
_JSON_TOKEN = re.compile(_STRING + r'|[{}\[\]:,]|[-+.0-9A-Za-z]+|[ \t\n\r]+', re.S)
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_STRING_OR_WHITESPACE = re.compile(f"({_STRING})|[ \\t\\n\\r]+", re.S)


class _NotACall(Exception):
    """The text cannot be the expected form, whatever follows it."""


class _NeedMore(_NotACall):
    """The text ends inside what may still become the expected form: wait for more (at the end: not a call)."""


def _skip_whitespace(text: str, pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()


def _expect(text: str, pos: int, literal: str) -> int:
    """The position after `literal`, which must come next in the text after whitespace."""
    pos = _skip_whitespace(text, pos)
    if text.startswith(literal, pos):
        return pos + len(literal)
    raise _NeedMore if literal.startswith(text[pos:pos + len(literal)]) else _NotACall


def _container_end(text: str, start: int) -> int:
    """The position just past the JSON object or array that opens at text[start]."""
    closers, pos = [], start
    while pos < len(text):
        token = _JSON_TOKEN.match(text, pos)
        if token is None:  # an open string runs to the end, or a character no JSON has outside strings
            raise _NeedMore if text[pos] == '"' else _NotACall
        pos, token = token.end(), token.group()
        if token in ("{", "["):
            closers.append("}" if token == "{" else "]")
        elif token in ("}", "]"):
            if token != closers.pop():
                raise _NotACall
            if not closers:
                return pos
    raise _NeedMore


def _read_json(text: str, pos: int, opener: str) -> tuple[object, int, int]:
    """The JSON object or array (by its `opener`) that must come next after whitespace: (value, start, end)."""
    start = _skip_whitespace(text, pos)
    if start == len(text):
        raise _NeedMore
    if text[start] != opener:
        raise _NotACall
    end = _container_end(text, start)
    try:
        return json.loads(text[start:end], parse_constant=_refuse), start, end
    except ValueError:
        raise _NotACall from None


def _refuse(constant: str):
    """json.loads takes NaN and Infinity, which are not JSON (a client's parser would refuse the arguments)."""
    raise ValueError(constant)


def _value_end(text: str, start: int) -> int:
    """Where the (valid) JSON value at text[start] ends."""
    if text[start] in "{[":
        return _container_end(text, start)
    return _JSON_TOKEN.match(text, start).end()


def _member_spans(text: str, start: int) -> dict[str, tuple[int, int]]:
    """Each member's value's (start, end) in the valid JSON object at text[start]; a repeated key keeps its last
    value, as json.loads does."""
    spans, pos = {}, _skip_whitespace(text, start + 1)
    while text[pos] == '"':
        key_end = _STRING_TOKEN.match(text, pos).end()
        value_start = _skip_whitespace(text, _expect(text, key_end, ":"))
        value_end = _value_end(text, value_start)
        spans[json.loads(text[pos:key_end])] = (value_start, value_end)
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

    def __init__(self, marker: str, read_block: Callable[[str, int], tuple[list[tuple[str, str]], int]]):
        super().__init__()
        self._marker, self._read_block = marker, read_block

    def _advance(self, final: bool) -> None:
        while True:
            start = self.text.find(self._marker, self.pos)
            if start == -1:
                held = 0 if final else _partial_marker(self.text, self.pos, self._marker)
                self._content_until(len(self.text) - held)
                return
            self._content_until(start)
            try:
                calls, end = self._read_block(self.text, start)
            except _NotACall as failure:
                if isinstance(failure, _NeedMore) and not final:
                    return
                self._content_until(start + len(self._marker))  # the marker is text; look for the next one
                continue
            self._add_calls(calls)
            self.pos = end


class _Llama3JsonStreamer(ToolStreamer):
    """The whole message is calls or content, so calls are known only at its end; a message that cannot be calls
    streams as content from the moment that shows."""

    def __init__(self):
        super().__init__()
        self._is_content = False

    def _advance(self, final: bool) -> None:
        if not self._is_content:
            try:
                calls = _read_llama3_calls(self.text)
            except _NotACall as failure:
                if isinstance(failure, _NeedMore) and not final:
                    return
                self._is_content = True
            else:  # calls so far; more may follow, or text that makes it all content
                if final:
                    self._add_calls(calls)
                    self.pos = len(self.text)
                return
        self._content_until(len(self.text))


# --- hermes: <tool_call>{"name": ..., "arguments": {...}}</tool_call> ---

_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"


def _read_hermes_block(text: str, start: int) -> tuple[list[tuple[str, str]], int]:
    obj, begin, end = _read_json(text, start + len(_HERMES_OPEN), "{")
    call = _call(obj, text, begin, "name", ("arguments", "parameters"))
    return [call], _expect(text, end, _HERMES_CLOSE)


# --- llama3_json: the message is {"name": ..., "parameters": {...}}, optionally after <|python_tag|>, ";"-separated ---

_PYTHON_TAG = "<|python_tag|>"


def _read_llama3_calls(text: str) -> list[tuple[str, str]]:
    pos = _skip_whitespace(text, 0)
    if text.startswith(_PYTHON_TAG, pos):
        pos += len(_PYTHON_TAG)
    elif _PYTHON_TAG.startswith(text[pos:pos + len(_PYTHON_TAG)]):
        raise _NeedMore
    calls = []
    while True:
        obj, begin, end = _read_json(text, pos, "{")
        calls.append(_call(obj, text, begin, "name", ("parameters", "arguments")))
        pos = _skip_whitespace(text, end)
        if pos == len(text):
            return calls
        if text[pos] != ";":
            raise _NotACall
        pos += 1


# --- command-r: Action: ```json [{"tool_name": ..., "parameters": {...}}, ...] ``` ---

_ACTION = "Action:"
# "No tool": the template tells the model to use `directly-answer`; Cohere's tool itself is `directly_answer`.
_DIRECTLY_ANSWER = ("directly_answer", "directly-answer")


def _read_action_block(text: str, start: int) -> tuple[list[tuple[str, str]], int]:
    fence = _expect(text, start + len(_ACTION), "```json")
    items, begin, end = _read_json(text, fence, "[")
    calls = [_call(item, text, item_start, "tool_name", ("parameters",))
             for item, item_start in zip(items, _element_starts(text, begin))]
    return [call for call in calls if call[0] not in _DIRECTLY_ANSWER], _expect(text, end, "```")


# --- forced: grammar-constrained output for tool_choice "required" or a named function ---

# The plan of a `required` output. The grammar (llguidance) writes an object's properties in the schema's order and
# allows whitespace between tokens. _NAME: the function's name; _ARGUMENTS: its arguments object; _NEXT: "," for
# another call or "]"; _END: nothing but whitespace.
_NAME, _ARGUMENTS, _NEXT, _END = "<name>", "<arguments>", "<next>", "<end>"
_REQUIRED_CALL = ["{", '"name"', ":", _NAME, ",", '"parameters"', ":", _ARGUMENTS, "}", _NEXT]


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
    Text that leaves the shape (none, under the grammar) is content from there on."""

    def __init__(self, function_name: str | None):
        super().__init__()
        self._name = function_name
        self._plan = [_ARGUMENTS, _END] if function_name else ["[", *_REQUIRED_CALL]
        self._arguments: _ObjectCursor | None = None  # while a call's arguments stream
        self._derailed = False

    def _advance(self, final: bool) -> None:
        while not self._derailed and self._step(final):
            pass
        if self._derailed:
            self._content_until(len(self.text))

    def _step(self, final: bool) -> bool:
        """Read the next step of the plan; False when the text so far is used up, or the output left the plan."""
        if self._arguments is not None:
            fragment, self.pos = self._arguments.take(self.text, self.pos)
            self._add_arguments(fragment)
            if not self._arguments.done:
                return False
            self._arguments = None
            return True
        start = _skip_whitespace(self.text, self.pos)
        if start == len(self.text):
            return False
        try:
            self.pos = self._read(self._plan[0], start)
        except _NotACall as failure:
            self._derailed = not isinstance(failure, _NeedMore) or final
            return False
        self._plan.pop(0)
        return True

    def _read(self, step: str, start: int) -> int:
        """Read `step` of the plan at text[start]; return the position after it."""
        text = self.text
        if step == _ARGUMENTS:
            if text[start] != "{":
                raise _NotACall
            self._start_call(self._name)
            self._arguments = _ObjectCursor()
            return start  # the cursor reads the object from its "{"
        if step == _NAME:
            name = _STRING_TOKEN.match(text, start)
            if name is None:
                raise _NeedMore if text[start] == '"' else _NotACall
            self._name = json.loads(name.group())
            return name.end()
        if step == _NEXT:
            if text[start] not in ",]":
                raise _NotACall
            self._plan.extend(_REQUIRED_CALL if text[start] == "," else [_END])
            return start + 1
        if step == _END:
            raise _NotACall
        return _expect(text, start, step)


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
