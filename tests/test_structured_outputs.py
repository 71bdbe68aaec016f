"""Structured outputs in the engine, with the real default model: every output matches its spec, a grammar's end
ends the output, max_tokens still cuts it, a constrained neighbour changes nothing for the others."""
import json
import re

import jsonschema
import pytest

from engine import SamplingParams
from engine.engine import RequestRefused
from engine.params import ParamError, StructuredOutputs
from tests.conftest import chat_prompt

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "address"], "additionalProperties": False}
ORDER = {"type": "object", "properties": {
    "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "properties": {
        "sku": {"type": "string", "maxLength": 8}, "quantity": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "quantity"], "additionalProperties": False}},
    "priority": {"enum": ["low", "normal", "high"]}},
    "required": ["items", "priority"], "additionalProperties": False}
REVIEW = {"type": "object", "properties": {
    "stars": {"type": "integer", "enum": [1, 2, 3, 4, 5]}, "verdict": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["fast", "slow", "cheap"]}, "maxItems": 3}},
    "required": ["stars", "verdict", "tags"], "additionalProperties": False}
SCHEMAS = {"person": PERSON, "order": ORDER, "review": REVIEW}


def _constrained(spec: StructuredOutputs, **kwargs) -> SamplingParams:
    return SamplingParams(structured_outputs=spec, **{"max_tokens": 160, "temperature": 0, **kwargs})


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_outputs_parse_and_validate(llm, name):
    prompts = [chat_prompt(f"Write a {name} as JSON."), chat_prompt(f"Invent a {name}. Answer in JSON only.")]
    params = [_constrained(StructuredOutputs(json=SCHEMAS[name])),
              _constrained(StructuredOutputs(json=json.dumps(SCHEMAS[name])), temperature=1.0, seed=7, n=2)]
    for out in llm.generate(prompts, params):
        for choice in out.outputs:
            assert choice.finish_reason == "stop", choice.text
            jsonschema.validate(json.loads(choice.text), SCHEMAS[name])


def test_json_object_regex_choice_and_grammars(llm):
    cases = [
        (StructuredOutputs(json_object=True), lambda text: isinstance(json.loads(text), dict)),
        (StructuredOutputs(regex=r"[A-Z][a-z]{1,8} is [0-9]{1,2} years old\."),
         lambda text: re.fullmatch(r"[A-Z][a-z]{1,8} is [0-9]{1,2} years old\.", text)),
        (StructuredOutputs(choice=["Paris", "London", "Rome \"the eternal\""]),
         lambda text: text in ("Paris", "London", "Rome \"the eternal\"")),
        (StructuredOutputs(grammar='start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"'),
         lambda text: text in ("The answer is yes.", "The answer is no.")),
        (StructuredOutputs(grammar='root ::= "x=" [0-9] [0-9]?'),  # GBNF, converted to Lark
         lambda text: re.fullmatch(r"x=[0-9][0-9]?", text)),
    ]
    prompts = [chat_prompt("Give a person's name and age as a JSON object.")] + \
        [chat_prompt("Tell me something about Paris.")] * (len(cases) - 1)
    outs = llm.generate(prompts, [_constrained(spec, max_tokens=200) for spec, _ in cases])
    for (spec, matches), out in zip(cases, outs):
        assert out.outputs[0].finish_reason == "stop" and matches(out.outputs[0].text), (spec, out.outputs[0].text)


def test_max_tokens_cuts_a_constrained_output_with_length(llm):
    out = llm.generate(chat_prompt("A person as JSON."), _constrained(StructuredOutputs(json=PERSON), max_tokens=5))
    choice = out[0].outputs[0]
    assert choice.finish_reason == "length" and len(choice.token_ids) == 5 and choice.text.startswith("{")


def test_a_constrained_neighbour_changes_nothing_for_the_others(llm):
    plain = [chat_prompt("Name three colours."), chat_prompt("What is 2 + 2?")]
    alone = llm.generate(plain, SamplingParams(max_tokens=24, temperature=0))
    mixed = llm.generate([plain[0], chat_prompt("A person as JSON."), plain[1]],
                         [SamplingParams(max_tokens=24, temperature=0), _constrained(StructuredOutputs(json=PERSON)),
                          SamplingParams(max_tokens=24, temperature=0)])
    assert [o.outputs[0].token_ids for o in alone] == [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids]


def test_specs_that_do_not_compile_are_refused_and_hold_nothing(llm):
    engine = llm.engine
    for spec in (StructuredOutputs(json={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}),
                 StructuredOutputs(json='{"type": "object"'), StructuredOutputs(regex="(unclosed"),
                 StructuredOutputs(grammar="start: undefined_rule"),
                 # GBNF the converter refuses, each with an exception of another kind
                 StructuredOutputs(grammar='root ::= "a'), StructuredOutputs(grammar='x ::= "a"'),
                 StructuredOutputs(grammar='root ::= "\\')):
        with pytest.raises(RequestRefused) as refused:
            llm.generate("Hi", _constrained(spec))
        assert refused.value.what == "structured_outputs"
    assert not engine.has_unfinished_requests() and engine.pool.num_free == engine.pool.num_blocks


def test_the_grammar_wins_over_controls_that_leave_it_no_token(llm):
    """allowed_token_ids or bad_words against the grammar, min_tokens barring the EOS that is all a complete grammar
    allows: the output still matches its spec, and ends as it would without them."""
    x = llm.get_tokenizer().encode("x", add_special_tokens=False)
    cases = [(StructuredOutputs(regex="[0-9]{3}"), dict(allowed_token_ids=x), r"[0-9]{3}"),
             (StructuredOutputs(choice=["yes"]), dict(bad_words=["yes"]), "yes"),
             (StructuredOutputs(regex="ok"), dict(min_tokens=4), "ok")]
    outs = llm.generate(["Count:"] * len(cases), [_constrained(spec, max_tokens=8, **kw) for spec, kw, _ in cases])
    for (_, _, pattern), out in zip(cases, outs):
        assert out.outputs[0].finish_reason == "stop" and re.fullmatch(pattern, out.outputs[0].text)


def test_json_whitespace_can_be_ruled_out_or_set(llm):
    prompt = chat_prompt("Give a person's name and age as a JSON object.")
    compact, spaced = llm.generate([prompt] * 2, [
        _constrained(StructuredOutputs(json=REVIEW, disable_any_whitespace=True)),
        _constrained(StructuredOutputs(json=REVIEW, whitespace_pattern=" ?"))])
    value = json.loads(compact.outputs[0].text)
    assert compact.outputs[0].text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    assert not re.search(r"[\n\t]|  ", spaced.outputs[0].text)  # REVIEW has no strings: no two spaces anywhere
    jsonschema.validate(json.loads(spaced.outputs[0].text), REVIEW)


@pytest.mark.parametrize("fields", [{}, {"json": {}, "regex": "a"}, {"choice": []}, {"regex": ""},
                                    {"json": {"x": {1, 2}}}, {"regex": "a", "disable_any_whitespace": True},
                                    {"json": {}, "whitespace_pattern": ""}])
def test_specs_are_one_valid_field(fields):
    with pytest.raises(ParamError) as error:
        StructuredOutputs(**fields)
    assert error.value.param == "structured_outputs"


def test_grammars_compile_once_per_spec(llm):
    grammars = llm.engine.grammars
    first = grammars.compile(StructuredOutputs(json={"type": "object", "properties": {"b": {}, "a": {}}}))
    # the same schema with its keys in another order is the same spec
    assert grammars.compile(StructuredOutputs(json={"properties": {"a": {}, "b": {}}, "type": "object"})) is first
    copies = grammars.matchers(StructuredOutputs(json={"type": "object", "properties": {"b": {}, "a": {}}}), 2)
    assert first not in copies and copies[0] is not copies[1]
