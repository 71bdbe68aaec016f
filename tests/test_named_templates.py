"""Named chat templates (Command-R's default, tool_use and rag): reading them, picking one per request, and what
reaches the template with it: tools, documents, tool calls."""
import json

import pytest
from tokenizers import Tokenizer as Backend, models

from models.tokenizer import load_tokenizer
from server.chat import ChatTemplateError, ChatTemplates, choose_template, load_template, render
from server.errors import ApiError
from server.protocol import chat_message
from server.tools import template_messages
from tests.helpers import VOCAB

NAMED = {"default": "D", "tool_use": "T", "rag": "R"}
HI = [{"role": "user", "content": "hi"}]


def test_pick_as_hugging_face_and_rag_for_documents():
    templates = ChatTemplates("D", NAMED)
    assert templates.pick(has_tools=False, has_documents=False) == "D"
    assert templates.pick(has_tools=True, has_documents=False) == "T"
    assert templates.pick(has_tools=False, has_documents=True) == "R"
    assert templates.pick(has_tools=True, has_documents=True) == "T"  # tools win, as Hugging Face picks


def test_pick_falls_back_to_the_default():
    assert ChatTemplates("D", {"default": "D", "rag": "R"}).pick(has_tools=True, has_documents=False) == "D"
    assert ChatTemplates("single").pick(has_tools=True, has_documents=True) == "single"
    assert ChatTemplates(None, {"tool_use": "T"}).pick(has_tools=False, has_documents=False) is None


def test_cohere_without_templates_gets_the_three_built_in_ones():
    templates = choose_template(None, None, "CohereForCausalLM")
    assert templates.default == load_template("command-r")
    assert templates.pick(has_tools=True, has_documents=False) == load_template("command-r-tool_use")
    assert templates.pick(has_tools=False, has_documents=True) == load_template("command-r-rag")
    flagged = choose_template("chatml", None, "CohereForCausalLM")  # the operator's one template, for every request
    assert flagged.pick(has_tools=True, has_documents=True) == load_template("chatml")


def test_gguf_named_templates():
    tokenizer = load_tokenizer(VOCAB / "ggml-vocab-command-r.gguf")
    assert set(tokenizer.chat_templates) == {"default", "tool_use", "rag"}
    assert tokenizer.chat_templates["default"] == tokenizer.chat_template
    assert "citation_mode" in tokenizer.chat_templates["rag"]
    assert load_tokenizer(VOCAB / "ggml-vocab-llama-spm.gguf").chat_templates == {}


@pytest.fixture
def folder(tmp_path):
    """A tokenizer folder with a two-word vocabulary; each test writes its own templates."""
    Backend(models.WordLevel({"hi": 0, "<unk>": 1}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def _configure(folder, chat_template):
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template}))


def test_folder_list_of_named_templates(folder):
    _configure(folder, [{"name": name, "template": text} for name, text in NAMED.items()])
    tokenizer = load_tokenizer(folder)
    assert tokenizer.chat_template == "D" and tokenizer.chat_templates == NAMED


def test_folder_single_template_has_no_named_ones(folder):
    _configure(folder, "only")
    tokenizer = load_tokenizer(folder)
    assert tokenizer.chat_template == "only" and tokenizer.chat_templates == {}


def test_folder_template_files_win_over_the_config(folder):
    """transformers' newer layout: chat_template.jinja and additional_chat_templates/<name>.jinja."""
    _configure(folder, "configured")
    (folder / "chat_template.jinja").write_text("D")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("T")
    tokenizer = load_tokenizer(folder)
    assert tokenizer.chat_template == "D" and tokenizer.chat_templates == {"default": "D", "tool_use": "T"}


def test_tools_and_documents_are_template_variables():
    variables = "{{ tools is none }} {{ documents is none }} {{ tools is defined }}"
    assert render(variables, HI, False) == "True True True"  # None when absent, as transformers passes them
    assert render("{{ tools[0].function.name }} {{ documents[0].title }}", HI, False, tools=[
        {"type": "function", "function": {"name": "f"}}], documents=[{"title": "T", "text": "x"}]) == "f T"


@pytest.mark.parametrize("name", ["tools", "documents"])
def test_kwargs_cannot_set_tools_or_documents(name):
    with pytest.raises(ChatTemplateError, match=name) as info:
        render("x", HI, False, extra={name: []})
    assert info.value.param == "chat_template_kwargs"


def _conversation(*messages: dict) -> list[dict]:
    return template_messages([chat_message(m) for m in messages], load_template("command-r-tool_use"), None)


def test_tool_call_arguments_become_mappings():
    call = {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"city": "Rome"}'}}
    rendered = _conversation({"role": "assistant", "content": None, "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": "a", "content": "sunny"})
    assert rendered[0]["tool_calls"] == [{**call, "function": {"name": "f", "arguments": {"city": "Rome"}}}]
    assert rendered[1]["name"] == "f"  # the function the result answers, which some templates read


@pytest.mark.parametrize("arguments", ["not json", "[1, 2]", '"text"', ""])
def test_tool_call_arguments_must_be_a_json_object(arguments):
    call = {"id": "a", "type": "function", "function": {"name": "f", "arguments": arguments}}
    with pytest.raises(ApiError, match="JSON object") as info:
        _conversation({"role": "assistant", "content": None, "tool_calls": [call]})
    assert info.value.param == "messages.0.tool_calls.0.function.arguments"


def test_openai_tool_calls_render_as_command_r_actions():
    """OpenAI's shape of a call (arguments as JSON text), made mappings, renders the Action block that the
    reference renders for the same call given as a mapping."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    messages = [*HI, *_conversation({"role": "assistant", "content": None, "tool_calls": [call]},
                                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"})]
    text = render(load_template("command-r-tool_use"), messages, True, "<BOS_TOKEN>", tools=[])
    assert ('<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>\nAction:\n```json\n[\n    {\n        "tool_name": "get_weather",\n'
            '        "parameters": {\n            "city": "Rome"\n        }\n    }\n]```\n'
            "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><results>\nsunny</results><|END_OF_TURN_TOKEN|>") in text


def test_environment_globals_as_the_reference():
    """`dict` builds dicts but cannot change one through its unbound methods; namespaces refuse underscore names."""
    assert render("{{ dict(a=1) }} {{ dict.fromkeys(['x'], 2) }}", [], False) == "{'a': 1} {'x': 2}"
    assert render("{% set ns = namespace(n=1) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}", [], False) == "2"
    for escape in ("{% set d = {'a': 1} %}{{ dict.update(d, {'b': 2}) }}",
                   "{% set ns = namespace(_x=1) %}", "{% set ns = namespace() %}{% set ns.__x = 1 %}"):
        with pytest.raises(ChatTemplateError):
            render(escape, [], False)
