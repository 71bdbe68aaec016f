"""Structured outputs and tool calls through a real server with the default model, with the OpenAI SDK: outputs
parse and validate, streamed or not; forced calls parse, validate and stream back to the whole call; a follow-up
turn with the tool's result runs; every bad spec or tool choice is a 400 naming its field, with no block held."""
import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.helpers import assert_error, assert_idle, running_server
from tests.test_structured_outputs import SCHEMAS

MODEL = "smol"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def url(default_model_path):
    with running_server("--model", str(default_model_path), "--served-model-name", MODEL, "--max-model-len", "1024",
                        "--num-kv-blocks", "256") as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)


def _streamed_text(stream) -> tuple[str, str]:
    chunks = [chunk.choices[0] for chunk in stream if chunk.choices]
    return "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_outputs_parse_and_validate(client, name, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
    args = dict(model=MODEL, messages=[{"role": "user", "content": f"Describe a {name} in JSON."}],
                response_format=fmt, max_tokens=200, temperature=0.7, seed=3)
    if stream:
        text, finish = _streamed_text(client.chat.completions.create(stream=True, **args))
    else:
        choice = client.chat.completions.create(**args).choices[0]
        text, finish = choice.message.content, choice.finish_reason
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_the_sdks_parse_helper_gets_its_model(client):
    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        country: str = pydantic.Field(max_length=20)
        population: int = pydantic.Field(ge=0, le=99_999_999)

    out = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Tell me about Paris."}],
                                        response_format=City, max_tokens=100, temperature=0)
    assert isinstance(out.choices[0].message.parsed, City)


def test_json_object_regex_choice_and_grammar(client):
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give a person's name and age as a JSON object."}],
        response_format={"type": "json_object"}, max_tokens=100, temperature=0).choices[0]
    assert answer.finish_reason == "stop" and isinstance(json.loads(answer.message.content), dict)
    date = client.completions.create(model=MODEL, prompt="Today's date is", max_tokens=20, temperature=0,
                                     extra_body={"structured_outputs": {"regex": r" [0-9]{4}-[0-9]{2}-[0-9]{2}"}})
    assert re.fullmatch(r" [0-9]{4}-[0-9]{2}-[0-9]{2}", date.choices[0].text)
    city = client.completions.create(model=MODEL, prompt="The capital of Italy is", max_tokens=5, temperature=0,
                                     extra_body={"structured_outputs": {"choice": ["Paris", "Rome", "Madrid"]}})
    assert city.choices[0].text in ("Paris", "Rome", "Madrid") and city.choices[0].finish_reason == "stop"
    grammar = 'start: "The answer is " ("yes" | "no") "."'
    streamed, finish = _streamed_text(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is Paris in France?"}], max_tokens=20, stream=True,
        extra_body={"structured_outputs": {"grammar": grammar}}))
    assert streamed in ("The answer is yes.", "The answer is no.") and finish == "stop"


def _calls(message) -> list[tuple[str, dict]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls]


def _streamed_calls(stream) -> tuple[dict[int, dict], str | None]:
    """A streamed answer's calls by index, reassembled from their deltas, and its finish reason."""
    calls, finish = {}, None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                if delta.id is not None:  # a call's first delta: its id, type and name
                    assert delta.index not in calls and delta.type == "function" and delta.function.name
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    assert delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    return calls, finish


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_forced_calls_parse_validate_and_stream_alike(client, tool_choice):
    args = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False,
                max_tokens=120, temperature=0)
    choice = client.chat.completions.create(**args).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [(name, arguments)] = _calls(choice.message)
    assert choice.message.tool_calls[0].id.startswith("call_")
    if tool_choice != "required":
        assert name == "get_time"
    jsonschema.validate(arguments, next(t for t in TOOLS if t["function"]["name"] == name)["function"]["parameters"])
    streamed, finish = _streamed_calls(client.chat.completions.create(stream=True, **args))
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed.values()] == \
        [(call.function.name, call.function.arguments) for call in choice.message.tool_calls]


def test_a_follow_up_turn_with_the_tool_result_runs(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = first.choices[0].message
    conversation = [*ASK, message.model_dump(exclude_none=True),  # as the SDK's users send it back
                    {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"temperature": 21}'}]
    answer = client.chat.completions.create(model=MODEL, messages=conversation, tools=TOOLS, max_tokens=30,
                                            temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens


def test_a_turn_without_tools_renders_earlier_calls_and_results(client):
    """The default model's template knows no tools: earlier calls and results are Hermes text whether this turn
    sends tools or not."""
    conversation = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        out = client.chat.completions.create(model=MODEL, messages=conversation, max_tokens=4, **extra)
        assert out.choices[0].finish_reason in ("stop", "length")


def test_a_forced_call_cut_by_a_stop_string_is_no_call(client):
    choice = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            stop=["Paris"]).choices[0]
    assert choice.finish_reason == "stop"


def test_tools_reach_the_prompt_unless_tool_choice_is_none(client):
    """The default model's template knows no tools: a system message describes them. `none` sends none."""
    def prompt_tokens(**extra) -> int:
        return client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, **extra).usage.prompt_tokens

    plain = prompt_tokens()
    assert prompt_tokens(tools=TOOLS, tool_choice="none") == plain
    assert prompt_tokens(tools=TOOLS) > plain + 50


def test_auto_reads_hermes_calls_and_leaves_other_text_content(url):
    """The model's output is what it is (a 135M model rarely calls); whatever it wrote comes back whole: as calls
    that validate, or as content."""
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 60, "temperature": 0}
    choice = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    if choice["finish_reason"] == "tool_calls":
        assert all(json.loads(call["function"]["arguments"]) is not None for call in choice["message"]["tool_calls"])
    else:
        assert choice["message"]["content"] and "tool_calls" not in choice["message"]


BAD_SCHEMA = {"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}
NO_ID = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    {"role": "tool", "content": "12:00"}]
BAD_ARGUMENTS = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "[1]"}}]}]


@pytest.mark.parametrize("path, fields, param", [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BAD_SCHEMA}}},
     "response_format"),
    ("completions", {"structured_outputs": {"json": BAD_SCHEMA}}, "structured_outputs"),
    ("completions", {"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ("chat", {"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs"),
    ("chat", {"structured_outputs": {"grammar": 'root ::= "a'}}, "structured_outputs"),
    ("chat", {"structured_outputs": {"regex": "a", "disable_any_whitespace": True}}, "structured_outputs"),
    ("chat", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ("chat", {"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("chat", {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, None),
    ("chat", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice"),
    ("chat", {"tools": [], "tool_choice": "required"}, "tool_choice"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": BAD_SCHEMA}}],
              "tool_choice": "required"}, "tools"),
    ("chat", {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),
    ("chat", {"tools": [WEATHER, WEATHER]}, "tools"),
    ("chat", {"tools": [{"type": "function", "function": {"name": f"f{i}", "parameters": {
        "type": "object", "description": "x" * 20_000}}} for i in range(64)], "tool_choice": "required"}, "tools"),
    ("chat", {"messages": NO_ID}, "messages.2.tool_call_id"),
    ("chat", {"messages": BAD_ARGUMENTS}, "messages.1.tool_calls.0.function.arguments"),
    ("chat", {"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
])
def test_bad_specs_and_tool_choices_are_400s_naming_the_field(url, path, fields, param):
    base = {"model": MODEL, "max_tokens": 4}
    base.update({"messages": ASK} if path == "chat" else {"prompt": "Hi"})
    for stream in (False, True):
        response = httpx.post(f"{url}/v1/{'chat/' if path == 'chat' else ''}completions",
                              json={**base, **fields, "stream": stream}, timeout=60)
        assert_error(response, 400, param=param)
    assert_idle(url)
