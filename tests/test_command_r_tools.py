"""A tiny Cohere checkpoint whose tokenizer config names its templates (default, tool_use, rag), served: a request
with tools renders `tool_use`, one with documents `rag` (citation_mode from chat_template_kwargs), any other the
default; and a Command-R tool template's calls are read in Command-R's own format."""
import openai
import pytest
from transformers import CohereConfig, CohereForCausalLM

from models.tokenizer import load_tokenizer
from server import chat
from server.protocol import ChatCompletionRequest
from server.tool_parsers import CommandRParser
from server.tools import tool_use
from tests.helpers import running_server, tiny_checkpoint

MODEL = "tiny-command-r"
ASK = [{"role": "user", "content": "What is the weather in Rome?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]
DOCUMENTS = [{"title": "Rome", "text": "Rome is sunny in June."}, {"title": "Oslo", "text": "Oslo is cool."}]
TEMPLATES = {"default": "command-r", "tool_use": "command-r-tool_use", "rag": "command-r-rag"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096)
    named = [{"name": name, "template": chat.load_template(builtin)} for name, builtin in TEMPLATES.items()]
    return tiny_checkpoint(tmp_path_factory.mktemp("command-r"), CohereForCausalLM,
                           CohereConfig(vocab_size=256000, **small), "ggml-vocab-command-r.gguf",
                           {"bos_token": "<BOS_TOKEN>", "eos_token": "<|END_OF_TURN_TOKEN|>", "add_bos_token": True,
                            "chat_template": named})


@pytest.fixture(scope="module")
def client(folder):
    with running_server("--model", str(folder), "--served-model-name", MODEL, "--num-kv-blocks", "512") as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)


def _expected_prompt_tokens(folder, name: str, **variables) -> int:
    tokenizer = load_tokenizer(folder)
    text = chat.render(chat.load_template(TEMPLATES[name]), ASK, True, "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>",
                       **variables)
    return len(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("name, fields, variables", [
    ("default", {}, {}),
    ("tool_use", {"tools": TOOLS}, {"tools": TOOLS}),
    ("rag", {"extra_body": {"documents": DOCUMENTS}}, {"documents": DOCUMENTS}),
    ("rag", {"extra_body": {"documents": DOCUMENTS, "chat_template_kwargs": {"citation_mode": "fast"}}},
     {"documents": DOCUMENTS, "extra": {"citation_mode": "fast"}}),
    ("rag", {"extra_body": {"chat_template_kwargs": {"documents": DOCUMENTS}}}, {"documents": DOCUMENTS}),
])
def test_each_request_renders_its_named_template(client, folder, name, fields, variables):
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, temperature=0, **fields)
    assert out.usage.prompt_tokens == _expected_prompt_tokens(folder, name, **variables)


def test_citation_modes_differ(folder):
    assert _expected_prompt_tokens(folder, "rag", documents=DOCUMENTS, extra={"citation_mode": "fast"}) != \
        _expected_prompt_tokens(folder, "rag", documents=DOCUMENTS, extra={"citation_mode": "accurate"})


def test_command_r_tool_template_reads_command_r_calls():
    request = ChatCompletionRequest.model_validate({"model": MODEL, "messages": ASK, "tools": TOOLS})
    use = tool_use(request, chat.load_template("command-r-tool_use"), None)
    assert isinstance(use.parser, CommandRParser) and not use.described and use.structured is None
    parsed = use.parser.parse('Action: ```json\n[{"tool_name": "get_weather", "parameters": {"city": "Rome"}}]\n```')
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", '{"city":"Rome"}')]
