"""Our templates and renderer against the official templates' renderings (shared/reference)."""
import json
from pathlib import Path

import pytest

from models.gguf_file import open_gguf
from models.tokenizer import load_tokenizer
from server.chat import ChatTemplateError, ChatTemplates, choose_template, load_template, render

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"
VECTORS = json.loads((REFERENCE / "chat_template_vectors.json").read_text())["vectors"]


@pytest.fixture(scope="module")
def templates(default_model_path):
    """Ours, and SmolLM2's own (rendered by our renderer)."""
    ours = {name: load_template(name) for name in ("llama-2-chat", "command-r", "command-r-tool_use", "command-r-rag")}
    return {**ours, "smollm2": load_tokenizer(default_model_path).chat_template}


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v['template']}:{v['name']}")
def test_reference_rendering(templates, vector):
    """Each vector with its tools, documents and chat_template_kwargs, as the server passes a request's."""
    args = (templates[vector["template"]], vector["messages"], vector["add_generation_prompt"],
            vector["bos_token"], vector["eos_token"], vector.get("chat_template_kwargs"), vector.get("tools"),
            vector.get("documents"))
    expected = vector["expected"]
    if isinstance(expected, dict):
        with pytest.raises(ChatTemplateError) as info:
            render(*args)
        assert expected["error"] in str(info.value)
    else:
        assert render(*args) == expected


def test_rag_template_is_the_one_command_r_ships():
    shipped = open_gguf(REFERENCE / "vocab" / "ggml-vocab-command-r.gguf").fields["tokenizer.chat_template.rag"]
    assert shipped.contents() in load_template("command-r-rag")


def test_choice_order():
    own = {"default": "model's own", "rag": "model's rag"}
    assert choose_template("chatml", "model's own", "LlamaForCausalLM", own) == ChatTemplates(load_template("chatml"))
    assert choose_template(None, "model's own", "LlamaForCausalLM") == ChatTemplates("model's own")
    assert choose_template(None, "model's own", "CohereForCausalLM", own) == ChatTemplates("model's own", own)
    assert choose_template(None, None, "LlamaForCausalLM") == ChatTemplates(load_template("llama-2-chat"))
    assert choose_template(None, None, "SomethingElse") == ChatTemplates(None)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render(None, [{"role": "user", "content": "hi"}], True)
    with pytest.raises(ChatTemplateError, match="neither a file nor a built-in"):
        load_template("no-such-template")


def test_sandbox_and_helpers():
    with pytest.raises(ChatTemplateError):
        render("{{ ''.__class__.__mro__ }}{{ messages.append(1) }}", [], False)
    assert render("{{ {'a': 'é<'} | tojson }}", [], False) == '{"a": "é<"}'
    assert len(render("{{ strftime_now('%Y') }}", [], False)) == 4
