"""Tool-call parsers: what each format reads as calls and as content, and that streaming any chunking of a text
gives what parsing it whole gives."""
import json
import random
import re
import struct
from pathlib import Path

import pytest

from server import partial_json
from server.tool_parsers import PARSERS, StreamDelta, forced_parser
from server.tools import forced_schema, parser_for_template, template_knows_tools, tools_system_prompt

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"
CALL_ID = re.compile(r"call_[a-zA-Z0-9]{24}")

TRICKY_ARGUMENTS = ('{"code": "if (a) { b(\\"}\\"); } </tool_call> <tool_call> ```", '
                    '"opts": {"deep": [1, {"x": "]"}], "n": -1.5e3, "ok": true, "none": null}}')
TRICKY_COMPACT = ('{"code":"if (a) { b(\\"}\\"); } </tool_call> <tool_call> ```",'
                  '"opts":{"deep":[1,{"x":"]"}],"n":-1.5e3,"ok":true,"none":null}}')
UNICODE_ARGUMENTS = '{"texte": "héllo wörld ✓ 日本 🙂", "escaped": "\\u00e9\\n\\"q\\" \\\\"}'
UNICODE_COMPACT = '{"texte":"héllo wörld ✓ 日本 🙂","escaped":"\\u00e9\\n\\"q\\" \\\\"}'


def hermes(name, arguments):
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def no_calls(*texts):
    """Texts that are content, verbatim (None if blank)."""
    return [(text, text if text.strip() else None, []) for text in texts]


# (text, expected content, expected [(name, arguments)])
HERMES = [
    (hermes("get_weather", '{"city": "Rome"}'), None, [("get_weather", '{"city":"Rome"}')]),
    (hermes("a", "{}") + "\n" + hermes("b", '{"x": [1, 2]}'), None, [("a", "{}"), ("b", '{"x":[1,2]}')]),
    ("Let me check.\n" + hermes("f", '{"a": 1}'), "Let me check.\n", [("f", '{"a":1}')]),
    (hermes("f", "{}") + " and text after", " and text after", [("f", "{}")]),
    ("\n\n" + hermes("f", "{}") + "\n", None, [("f", "{}")]),
    (hermes("run", TRICKY_ARGUMENTS), None, [("run", TRICKY_COMPACT)]),
    (hermes("traduire", UNICODE_ARGUMENTS), None, [("traduire", UNICODE_COMPACT)]),
    ('<tool_call>{"name": "f", "arguments": {\n  "a" : [1, 2] ,\n  "s": "x  y"\n}}</tool_call>', None,
     [("f", '{"a":[1,2],"s":"x  y"}')]),
    ('<tool_call>{"name": "f", "parameters": {"a": 1}}</tool_call>', None, [("f", '{"a":1}')]),
    # A good block after a malformed one is still a call.
    ("<tool_call>not json</tool_call>" + hermes("g", "{}"), "<tool_call>not json</tool_call>", [("g", "{}")]),
    *no_calls(
        # Malformed blocks.
        '<tool_call>{"name": "f", "arguments": {bad}}</tool_call> done',
        '<tool_call>{"name": "f", "arguments": {}} oops</tool_call>',
        '<tool_call>{"name": "f"}</tool_call>',
        '<tool_call>{"name": "f", "arguments": "{}"}</tool_call>',
        '<tool_call>["f"]</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
        # Unterminated: a block without its closing tag, a JSON text cut short, a marker cut short.
        'Sure <tool_call>{"name": "f", "arguments": {"a": 1}}',
        '<tool_call>{"name": "f", "arguments": {"a": "</tool_call>',
        "Hi <tool_c",
        "a < b and <tag> <tool_call </tool_call>",
        "Just an answer, with ünïcode.", "", "  \n "),
]

LLAMA3 = [
    ('{"name": "get_weather", "parameters": {"city": "Rome"}}', None, [("get_weather", '{"city":"Rome"}')]),
    ('<|python_tag|>{"name": "f", "arguments": {"a": 1}}', None, [("f", '{"a":1}')]),
    ('\n {"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": [1, 2]}}\n', None,
     [("a", "{}"), ("b", '{"x":[1,2]}')]),
    ('{"name": "run", "parameters": ' + TRICKY_ARGUMENTS + "}", None, [("run", TRICKY_COMPACT)]),
    ('{"name": "traduire", "parameters": ' + UNICODE_ARGUMENTS + "}", None, [("traduire", UNICODE_COMPACT)]),
    *no_calls("The weather is nice.", '{"answer": 42}', '{"name": "Alice", "age": 30}',
              '{"name": "f", "parameters": {"a": 1}} and more', '{"name": "f", "parameters": {"a": 1}};',
              '{"name": "f", "parameters": {"a": ', '{"name": "f", "parameters": {bad}}', "<b>bold</b>",
              "<|python_tag|>print(1)", "<|python", ""),
]


def action(items_json):
    return f"Action: ```json\n{items_json}\n```"


COMMAND_R = [
    (action('[{"tool_name": "get_weather", "parameters": {"city": "Rome"}}]'), None,
     [("get_weather", '{"city":"Rome"}')]),
    ("Plan: I will look up the weather, then the time.\n"
     + action('[{"tool_name": "get_weather", "parameters": {"city": "Rome"}}, {"tool_name": "now", "parameters": {}}]'),
     "Plan: I will look up the weather, then the time.\n", [("get_weather", '{"city":"Rome"}'), ("now", "{}")]),
    (action('[{"tool_name": "directly_answer", "parameters": {}}]'), None, []),
    ("Plan: I can answer directly.\n" + action('[{"tool_name": "directly-answer", "parameters": {}}]'),
     "Plan: I can answer directly.\n", []),
    (action('[{"tool_name": "run", "parameters": ' + TRICKY_ARGUMENTS + "}]"), None, [("run", TRICKY_COMPACT)]),
    (action('[{"tool_name": "traduire", "parameters": ' + UNICODE_ARGUMENTS + "}]"), None,
     [("traduire", UNICODE_COMPACT)]),
    *no_calls("Action: take a walk", action('[{"tool_name": "f", "parameters": {bad}}]'),
              action('[{"name": "f", "parameters": {}}]'), 'Action: ```json\n[{"tool_name": "f", "parameters": {}}]',
              "Reaction: Act"),
]

FORCED_NAMED = [
    ('{"city": "Rome"}', None, [("get_weather", '{"city":"Rome"}')]),
    ('\n{\n  "city" : "Ro me",\n  "n": [1, {"a": "}"}]\n}\n', None,
     [("get_weather", '{"city":"Ro me","n":[1,{"a":"}"}]}')]),
    (TRICKY_ARGUMENTS, None, [("get_weather", TRICKY_COMPACT)]),
    (UNICODE_ARGUMENTS, None, [("get_weather", UNICODE_COMPACT)]),
    ('{"city": "Ro', None, [("get_weather", '{"city":"Ro')]),  # cut short by max_tokens
    ('{"city": "Rome"} extra', " extra", [("get_weather", '{"city":"Rome"}')]),
    *no_calls("not json", ""),
]

FORCED_REQUIRED = [
    ('[{"name": "get_weather", "parameters": {"city": "Rome"}}]', None, [("get_weather", '{"city":"Rome"}')]),
    ('[ {"name" : "a", "parameters": {}},\n {"name": "b", "parameters": {"q": "[\\"]}"}} ]', None,
     [("a", "{}"), ("b", '{"q":"[\\"]}"}')]),
    ('[{"name": "run", "parameters": ' + TRICKY_ARGUMENTS + "}]", None, [("run", TRICKY_COMPACT)]),
    ('[{"name": "traduire", "parameters": ' + UNICODE_ARGUMENTS + "}]", None, [("traduire", UNICODE_COMPACT)]),
    ('[{"name": "a", "parameters": {"x": [1, ', None, [("a", '{"x":[1,')]),  # cut short by max_tokens
    ('[{"name": "a", "parameters": {}}] extra', " extra", [("a", "{}")]),
    *no_calls('{"name": "a"}'),
]

CASES = [("hermes", PARSERS["hermes"], HERMES), ("llama3_json", PARSERS["llama3_json"], LLAMA3),
         ("command-r", PARSERS["command-r"], COMMAND_R),
         ("forced-named", lambda: forced_parser("get_weather"), FORCED_NAMED),
         ("forced-required", lambda: forced_parser(None), FORCED_REQUIRED)]
ALL = [pytest.param(make, text, content, calls, id=f"{family}-{i}")
       for family, make, texts in CASES for i, (text, content, calls) in enumerate(texts)]


def parsed(parser, text):
    result = parser.parse(text)
    assert all(CALL_ID.fullmatch(call.id) for call in result.calls)
    return result.content, [(call.name, call.arguments) for call in result.calls]


def streamed(parser, chunks):
    """Feed the chunks; check the deltas' shape as OpenAI's; reassemble content and calls."""
    streamer = parser.streamer()
    deltas = [streamer.feed(chunk) for chunk in chunks] + [streamer.finish()]
    content, calls = "", {}
    for delta in deltas:
        content += delta.content
        for call in delta.calls:
            if call.index not in calls:  # a call's first delta carries its id and name
                assert call.index == len(calls) and CALL_ID.fullmatch(call.id) and call.name
                calls[call.index] = [call.name, ""]
            else:
                assert call.id is None and call.name is None and call.arguments
            calls[call.index][1] += call.arguments
    # Content that is only whitespace is never streamed, as parse calls it None.
    return content or None, [tuple(call) for call in calls.values()]


@pytest.mark.parametrize("make, text, content, calls", ALL)
def test_parse(make, text, content, calls):
    assert parsed(make(), text) == (content, calls)


@pytest.mark.parametrize("make, text, content, calls", ALL)
def test_streaming_any_chunking_gives_the_parse(make, text, content, calls):
    parser, expected = make(), (content, calls)
    assert streamed(parser, [text]) == expected
    assert streamed(parser, list(text)) == expected
    for cut in range(len(text) + 1):
        assert streamed(parser, [text[:cut], text[cut:]]) == expected, cut
    rng = random.Random(len(text))
    for _ in range(30):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(2, 8))))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert streamed(parser, chunks) == expected, chunks


def feed_all(streamer, chunks):
    return [streamer.feed(chunk) for chunk in chunks]


def test_hermes_streams_content_at_once_but_a_possible_marker():
    streamer = PARSERS["hermes"]().streamer()
    assert streamer.feed("Hello <tool").content == "Hello "
    assert streamer.feed("bar> x").content == "<toolbar> x"
    assert streamer.feed(" <tool_call>{\"name\": \"f\", \"arguments\": {}}").content == " "
    delta = streamer.feed("</tool_call>")
    assert delta.content == "" and [(c.name, c.arguments) for c in delta.calls] == [("f", "{}")]


def test_hermes_releases_a_call_when_its_block_closes():
    deltas = feed_all(PARSERS["hermes"]().streamer(), hermes("f", '{"a": 1}'))
    assert [i for i, d in enumerate(deltas) if d.calls] == [len(deltas) - 1]


def test_llama3_json_holds_json_until_the_end_and_streams_text_at_once():
    streamer = PARSERS["llama3_json"]().streamer()
    assert feed_all(streamer, ['{"name": "f", ', '"parameters": {}}']) == [StreamDelta(), StreamDelta()]
    assert [(c.name, c.arguments) for c in streamer.finish().calls] == [("f", "{}")]
    streamer = PARSERS["llama3_json"]().streamer()
    assert streamer.feed("The answer").content == "The answer"
    streamer = PARSERS["llama3_json"]().streamer()
    assert streamer.feed('{"answer": 4').content == ""
    assert streamer.feed("2} and").content == '{"answer": 42} and'  # a complete object that is no call


def test_command_r_streams_the_plan_and_holds_the_action():
    streamer = PARSERS["command-r"]().streamer()
    assert streamer.feed("Plan: look it up.\nAct").content == "Plan: look it up.\n"
    assert streamer.feed('ion: ```json\n[{"tool_name": "f", "parameters": {}}]').content == ""
    assert [(c.name, c.arguments) for c in streamer.feed("\n```").calls] == [("f", "{}")]


def test_forced_streams_arguments_as_they_arrive():
    text = '[{"name": "write", "parameters": {"text": "a long string, streamed piece by piece"}}]'
    deltas = feed_all(forced_parser(None).streamer(), [text[i:i + 5] for i in range(0, len(text), 5)])
    fragments = [c for d in deltas for c in d.calls]
    assert fragments[0].name == "write" and len(fragments) > 5
    assert "".join(c.arguments for c in fragments) == '{"text":"a long string, streamed piece by piece"}'


# A 50 KB arguments object: a long string with escapes and the formats' markers, many small values, whitespace.
BIG_VALUE = {"code": 'print("</tool_call> ```")\n' * 850, "rows": [[i, -i / 4, True, None, "x"] for i in range(550)]}
BIG_ARGUMENTS, BIG_COMPACT = json.dumps(BIG_VALUE, indent=1), json.dumps(BIG_VALUE, separators=(",", ":"))
BIG_CALLS = [(PARSERS["hermes"], "Running it.\n" + hermes("run", BIG_ARGUMENTS), "Running it.\n"),
             (PARSERS["llama3_json"], '{"name": "run", "parameters": ' + BIG_ARGUMENTS + "}", None),
             (PARSERS["command-r"], action('[{"tool_name": "run", "parameters": ' + BIG_ARGUMENTS + "}]"), None),
             (lambda: forced_parser("run"), BIG_ARGUMENTS, None),
             (lambda: forced_parser(None), '[{"name": "run", "parameters": ' + BIG_ARGUMENTS + "}]", None)]


class Counting:
    """Stands in for one of the parsers' compiled patterns or their JSON decoder, adding the characters each call
    reads to a shared tally."""

    def __init__(self, target, tally: list[int]):
        self.target, self.tally = target, tally

    def match(self, text, pos):
        found = self.target.match(text, pos)  # the parsers' patterns match runs, possibly empty: never None
        self.tally[0] += found.end() - pos + 1  # the run and the character after it
        return found

    def sub(self, replacement, text):
        self.tally[0] += len(text)
        return self.target.sub(replacement, text)

    def decode(self, text):
        self.tally[0] += len(text)
        return self.target.decode(text)

    def raw_decode(self, text, pos):
        value, end = self.target.raw_decode(text, pos)
        self.tally[0] += end - pos
        return value, end


@pytest.mark.parametrize("make, text, content", BIG_CALLS, ids=[family for family, _, _ in CASES])
def test_streaming_reads_each_character_a_bounded_number_of_times(monkeypatch, make, text, content):
    """A streamer keeps its place between feeds: a 50 KB call fed 4 characters at a time is read a few times over
    in all (scanned, decoded, its arguments located and compacted), not once per feed."""
    tally = [0]
    for name in ("_WHITESPACE", "_BETWEEN", "_STRING_BODY", "_STRING_OR_WHITESPACE", "_DECODER"):
        monkeypatch.setattr(partial_json, name, Counting(getattr(partial_json, name), tally))
    take = partial_json.ObjectCursor.take

    def counted_take(cursor, text, pos):
        fragment, end = take(cursor, text, pos)
        tally[0] += end - pos
        return fragment, end

    monkeypatch.setattr(partial_json.ObjectCursor, "take", counted_take)
    chunks = [text[i:i + 4] for i in range(0, len(text), 4)]
    assert streamed(make(), chunks) == (content, [("run", BIG_COMPACT)])
    assert len(text) > 50_000 and tally[0] < 8 * len(text)  # ~4 (command-r 5, forced 1); re-read per feed: thousands


def test_the_command_r_templates_own_example_of_a_call_parses():
    """The tool-use template renders an assistant's tool call as it tells the model to write one."""
    vectors = json.loads((REFERENCE / "chat_template_vectors.json").read_text())["vectors"]
    vector = next(v for v in vectors if v["name"] == "tool_use_assistant_content_null_with_tool_calls")
    rendered = re.search(r"Action:.*?\]```", vector["expected"], re.S).group()
    assert "Write 'Action:' followed by a json-formatted list of actions" in vector["expected"]
    assert parsed(PARSERS["command-r"](), "\n" + rendered) == (None, [("get_weather", '{"city":"Rome"}')])


LLAMA31_LIKE = ('{%- if tools is not none %}{{- "<|start_header_id|>ipython<|end_header_id|>" }}'
                '{{- \'{"name": function name, "parameters": dictionary}\' }}{%- endif %}<|python_tag|>')


def gguf_string(path: Path, key: str) -> str:
    """A string value of a GGUF's metadata, found by its key's bytes (reading the whole vocabulary takes seconds)."""
    data, key_bytes = path.read_bytes(), key.encode()
    at = data.index(struct.pack("<Q", len(key_bytes)) + key_bytes) + 8 + len(key_bytes)
    value_type, length = struct.unpack_from("<IQ", data, at)
    assert value_type == 8  # GGUF's string type
    return data[at + 12:at + 12 + length].decode()


def test_parser_and_tools_from_the_template():
    command_r = REFERENCE / "vocab" / "ggml-vocab-command-r.gguf"
    tool_use = gguf_string(command_r, "tokenizer.chat_template.tool_use")
    rag = gguf_string(command_r, "tokenizer.chat_template.rag")
    assert (parser_for_template(tool_use), template_knows_tools(tool_use)) == ("command-r", True)
    # RAG's template speaks of "tools" only in its text.
    assert (parser_for_template(rag), template_knows_tools(rag)) == ("hermes", False)
    assert (parser_for_template(LLAMA31_LIKE), template_knows_tools(LLAMA31_LIKE)) == ("llama3_json", True)
    qwen_like = "{%- if tools %}<tool_call>{{ tool | tojson }}</tool_call>{%- endif %}"
    assert (parser_for_template(qwen_like), template_knows_tools(qwen_like)) == ("hermes", True)
    chatml = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' tools }}' + m['content'] }}{% endfor %}"
    assert (parser_for_template(chatml), template_knows_tools(chatml)) == ("hermes", False)
    assert (parser_for_template(None), template_knows_tools(None)) == ("hermes", False)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}},
         {"type": "function", "function": {"name": "now"}}]


def test_tools_system_prompt_gives_each_signature_and_the_call_format():
    prompt = tools_system_prompt(TOOLS)
    for tool in TOOLS:
        assert json.dumps(tool["function"], ensure_ascii=False) in prompt
    assert "<tool_call>" in prompt and "</tool_call>" in prompt


def test_forced_schema():
    assert forced_schema(TOOLS, "get_weather", parallel=True) == TOOLS[0]["function"]["parameters"]
    assert forced_schema(TOOLS, "now", parallel=True) == {"type": "object"}
    schema = forced_schema(TOOLS, None, parallel=True)
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    assert schema["items"]["anyOf"][1] == {
        "type": "object", "properties": {"name": {"const": "now"}, "parameters": {"type": "object"}},
        "required": ["name", "parameters"], "additionalProperties": False}
    assert forced_schema(TOOLS, None, parallel=False)["maxItems"] == 1


def test_forced_outputs_fit_their_schemas():
    jsonschema = pytest.importorskip("jsonschema")
    output = '[{"name": "get_weather", "parameters": {"city": "Rome"}}, {"name": "now", "parameters": {}}]'
    jsonschema.validate(json.loads(output), forced_schema(TOOLS, None, parallel=True))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(output), forced_schema(TOOLS, None, parallel=False))
    assert [c.name for c in forced_parser(None).parse(output).calls] == ["get_weather", "now"]


UNTYPED = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"type": "string"}}}}}]
UNTYPED_AS_OBJECT = {"type": "object", "properties": {"a": {"type": "string"}}}


def test_forced_schemas_hold_parameters_without_a_type_to_an_object():
    """Without "type", a schema lets the grammar write a string, number, array, null or boolean: no call."""
    assert forced_schema(UNTYPED, "f", parallel=True) == UNTYPED_AS_OBJECT
    required = forced_schema(UNTYPED, None, parallel=True)
    assert required["items"]["anyOf"][0]["properties"]["parameters"] == UNTYPED_AS_OBJECT
    assert "type" not in UNTYPED[0]["function"]["parameters"]  # the request's tools are left as they came
    assert parsed(forced_parser("f"), '{"a": "x"}') == (None, [("f", '{"a":"x"}')])
    assert parsed(forced_parser(None), '[{"name": "f", "parameters": {"a": "x"}}]') == (None, [("f", '{"a":"x"}')])


def test_forced_schemas_without_a_type_admit_only_objects():
    jsonschema = pytest.importorskip("jsonschema")
    for value in ("x", 1, [], None, True):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(value, forced_schema(UNTYPED, "f", parallel=True))
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate([{"name": "f", "parameters": value}], forced_schema(UNTYPED, None, parallel=True))
    jsonschema.validate({"a": "x"}, forced_schema(UNTYPED, "f", parallel=True))


PIECES = ['<tool_call>', '</tool_call>', '{', '}', '[', ']', '"', '\\', ':', ',', ';', ' ', '\n', 'a', 'é', '"f"',
          '"name"', '"arguments"', '"parameters"', '"tool_name"', '1', 'true', '<|python_tag|>', 'Action:', '```json',
          '```', '<tool', '"directly_answer"', '{"name": "f", "arguments": {}}', '{"tool_name": "g", "parameters": {}}',
          '[{"name": "f", "parameters": {"x": "}"}}]']


@pytest.mark.parametrize("family, make", [(family, make) for family, make, _ in CASES],
                         ids=[family for family, _, _ in CASES])
def test_random_texts_stream_as_they_parse(family, make):
    """Texts strung together from the formats' pieces, most of them broken, in random chunks."""
    rng, parser = random.Random(family), make()
    for _ in range(300):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12)))
        expected = parsed(parser, text)
        if family in ("hermes", "llama3_json") and not expected[1]:  # no call: the text is the content, verbatim
            assert expected[0] == (text if text.strip() else None)
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        assert streamed(parser, [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]) == expected, text
        assert streamed(parser, list(text)) == expected, text
