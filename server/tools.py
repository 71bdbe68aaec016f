"""Tool calling in chat: what a request's `tools` and `tool_choice` make of its prompt, its sampling and its answer.

`auto` lets the model call tools in its family's own format, which `server/tool_parsers.py` reads back (text that
does not parse stays content). `required` and a named function constrain decoding to JSON of the calls
(`forced_schema`), so that they always parse and their arguments follow the functions' schemas. `none` sends no
tools. A template that knows no tools gets them described in a system message, in the Hermes format."""
import functools
import json
import re
from dataclasses import dataclass

from engine.params import ParamError, StructuredOutputs
from server.errors import ApiError
from server.protocol import AssistantMessage, ChatCompletionRequest, TextMessage, ToolMessage
from server.tool_parsers import ACTION, PARSERS, PYTHON_TAG, CallDelta, ToolParser, ToolStreamer, forced_parser


@dataclass(frozen=True)
class ToolUse:
    tools: list[dict]  # OpenAI's tool objects, as templates take them
    parser: ToolParser  # reads the calls out of a choice's text
    structured: StructuredOutputs | None  # required or a named function: the calls' grammar
    described: bool  # the template knows no tools: a system message describes them, and calls are Hermes'
    parallel: bool  # several calls in one answer


def tool_use(req: ChatCompletionRequest, template: str | None, parser_name: str | None) -> ToolUse | None:
    """The request's tool use, or None when it sends the model no tools; a 400 for a choice that cannot be met."""
    choice = req.tool_choice or ("auto" if req.tools else "none")
    if req.tools is None and choice != "none":
        raise ApiError(400, "tool_choice needs tools", "invalid_request", "tool_choice")
    if choice == "none":
        return None
    tools = [tool.model_dump(exclude_none=True) for tool in req.tools]
    forced = _forced_function(req, choice, [tool.function.name for tool in req.tools])
    parallel = req.parallel_tool_calls is not False
    described = not template_knows_tools(template)
    if forced is None:
        name = "hermes" if described else parser_name or parser_for_template(template)
        return ToolUse(tools, PARSERS[name](), None, described, parallel)
    function = None if forced == "required" else forced
    try:
        structured = StructuredOutputs(json=forced_schema(tools, function, parallel))
    except ParamError as exc:  # the functions' schemas together are over the size a spec may have
        raise ApiError(400, f"the tools' parameters cannot constrain a call: {exc}", "invalid_request",
                       "tools") from exc
    return ToolUse(tools, forced_parser(function), structured, described, parallel)


def _forced_function(req: ChatCompletionRequest, choice, names: list[str]) -> str | None:
    """What tool_choice forces: "required", a function's name, or None (auto); a 400 for a choice that cannot be
    met."""
    if len(set(names)) < len(names):
        raise ApiError(400, "tools has two functions of the same name", "invalid_request", "tools")
    forced = None if choice == "auto" else choice if choice == "required" else choice.function.name
    if forced is not None and not names:
        raise ApiError(400, f"tool_choice {forced!r} needs at least one function in tools", "invalid_request",
                       "tool_choice")
    if forced not in (None, "required", *names):
        raise ApiError(400, f"tool_choice names the function {forced!r}, which is not among the tools "
                            f"({', '.join(names)})", "invalid_request", "tool_choice")
    if forced is not None and req.constrains_output:
        raise ApiError(400, f"{req.structured_field} cannot be combined with tool_choice {forced!r}, which constrains "
                            "the output itself", "invalid_request", req.structured_field)
    return forced


def template_messages(messages: list[TextMessage | AssistantMessage | ToolMessage], template: str | None,
                      use: ToolUse | None) -> list[dict]:
    """The conversation as `template` takes it: an assistant's calls with their arguments as mappings, a tool message
    with the name of the function it answers. A template that knows no tools gets calls and results as Hermes text
    (whether this turn sends tools or not), and a system message that describes the tools this turn sends."""
    called = {call.id: call.function.name
              for m in messages if isinstance(m, AssistantMessage) for call in m.tool_calls or ()}
    rendered = [_for_template(i, m, called) for i, m in enumerate(messages)]
    if template_knows_tools(template):
        return rendered
    rendered = [_as_hermes_text(m) for m in rendered]
    if use is None:
        return rendered
    description = tools_system_prompt(use.tools)
    if rendered[0]["role"] == "system":
        return [{**rendered[0], "content": f"{rendered[0]['content']}\n\n{description}"}, *rendered[1:]]
    return [{"role": "system", "content": description}, *rendered]


def _message_error(index: int, field: str, message: str) -> ApiError:
    return ApiError(400, f"messages[{index}]: {message}", "invalid_request", f"messages.{index}.{field}")


def _for_template(index: int, message: TextMessage | AssistantMessage | ToolMessage, called: dict[str, str]) -> dict:
    out = message.for_template()
    if out["tool_calls"]:
        out["tool_calls"] = [_call_for_template(index, k, call) for k, call in enumerate(out["tool_calls"])]
    if message.role == "tool" and message.tool_call_id in called:
        out["name"] = out["name"] or called[message.tool_call_id]
    return out


def _call_for_template(index: int, k: int, call: dict) -> dict:
    """Hugging Face templates read a call's arguments as a mapping; OpenAI's API carries them as JSON text."""
    try:
        arguments = json.loads(call["function"]["arguments"])
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise _message_error(index, f"tool_calls.{k}.function.arguments", "a call's arguments must be a JSON object")
    return {**call, "function": {**call["function"], "arguments": arguments}}


def _as_hermes_text(message: dict) -> dict:
    """A call or a result as text a template without tools renders: `<tool_call>` and `<tool_response>` blocks,
    the result in a user turn (as Hermes-style templates put it)."""
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    if not message.get("tool_calls"):
        return message
    calls = "\n".join(f"<tool_call>\n{json.dumps(_call_body(c), ensure_ascii=False)}\n</tool_call>"
                      for c in message["tool_calls"])
    text = "\n".join(part for part in (message["content"], calls) if part)
    return {**{k: v for k, v in message.items() if k != "tool_calls"}, "content": text}


def _call_body(call: dict) -> dict:
    return {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}


def assistant_message(text: str, use: ToolUse | None) -> dict:
    """A finished choice's message: its text, or the calls read out of it and the text around them."""
    if use is None:
        return {"role": "assistant", "content": text}
    parsed = use.parser.parse(text)
    calls = parsed.calls if use.parallel else parsed.calls[:1]
    message = {"role": "assistant", "content": parsed.content if calls else parsed.content or ""}
    if calls:
        message["tool_calls"] = [{"id": call.id, "type": "function",
                                  "function": {"name": call.name, "arguments": call.arguments}} for call in calls]
    return message


def finish_reason(reason: str | None, called: bool, stop_reason: int | str | None) -> str | None:
    """OpenAI's `tool_calls` for an answer that ended with calls; one cut short (by max_tokens, a stop string or a
    stop token) keeps its reason."""
    return "tool_calls" if called and reason == "stop" and stop_reason is None else reason


class StreamedCalls:
    """One streamed choice's text, turned into content and call deltas as it comes."""

    def __init__(self, use: ToolUse):
        self.streamer: ToolStreamer = use.parser.streamer()
        self.parallel = use.parallel
        self.called = False

    def feed(self, text: str, finished: bool) -> tuple[str, list[dict]]:
        """The content and OpenAI `delta.tool_calls` entries that `text`, the choice's new text, releases."""
        deltas = [self.streamer.feed(text)] + ([self.streamer.finish()] if finished else [])
        calls = [call for d in deltas for call in d.calls if self.parallel or call.index == 0]
        self.called = self.called or bool(calls)
        return "".join(d.content for d in deltas), [_delta_entry(call) for call in calls]


def _delta_entry(call: CallDelta) -> dict:
    """A call's first delta carries its id, type and name; later ones fragments of its arguments."""
    function = {"arguments": call.arguments}
    if call.name is None:
        return {"index": call.index, "function": function}
    return {"index": call.index, "id": call.id, "type": "function", "function": {"name": call.name, **function}}


# --- Choosing a format, and what the model is told ---

# A Jinja tag ({{ }} or {% %}) with the string literals in it, which may hold "}}" or "%}".
_JINJA_STRING = r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\""""
_JINJA_TAG = re.compile(r"\{[{%]((?:" + _JINJA_STRING + r"|[^'\"])*?)[%}]\}", re.S)


def parser_for_template(template: str | None) -> str:
    """The format a chat template's model writes its calls in; "hermes" (ours, with tools_system_prompt) when the
    template shows none."""
    if template is None:
        return "hermes"
    if ACTION in template and "tool_name" in template:
        return "command-r"
    if PYTHON_TAG in template or ("<|start_header_id|>" in template
                                  and ("ipython" in template or '"parameters"' in template)):
        return "llama3_json"
    return "hermes"


@functools.lru_cache(maxsize=16)  # a server renders a few templates all its life, twice a request with tools
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
    """The function's parameters schema, always an object's: one without a `type` would let the grammar write the
    arguments as a string, number, array, null or boolean, which no parser reads as a call."""
    return {"type": "object", **(function.get("parameters") or {})}
