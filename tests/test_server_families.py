"""Tiny Llama-2 and Cohere checkpoint folders with their real vocabularies, served end to end: chat through
the server (streaming and not) gives the tokens the offline API gives for the same prompt."""
import httpx
import openai
import pytest
import torch
from transformers import CohereConfig, CohereForCausalLM, LlamaConfig, LlamaForCausalLM

from engine import LLM, SamplingParams
from models.gguf_file import open_gguf
from models.tokenizer import load_tokenizer
from tests.helpers import VOCAB, running_server, tiny_checkpoint

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]


@pytest.fixture(scope="module", params=["llama-2", "command-r"])
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    if request.param == "llama-2":
        folder = tiny_checkpoint(path, LlamaForCausalLM, LlamaConfig(vocab_size=32000, **small),
                                 "ggml-vocab-llama-spm.gguf",
                                 {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
        bos = "<s>"
    else:
        template = open_gguf(VOCAB / "ggml-vocab-command-r.gguf").fields["tokenizer.chat_template"].contents()
        folder = tiny_checkpoint(path, CohereForCausalLM, CohereConfig(vocab_size=256000, **small),
                                 "ggml-vocab-command-r.gguf",
                                 {"bos_token": "<BOS_TOKEN>", "eos_token": "<|END_OF_TURN_TOKEN|>",
                                  "add_bos_token": True, "chat_template": template})
        bos = "<BOS_TOKEN>"
    with running_server("--model", str(folder), "--max-model-len", "256", "--num-kv-blocks", "64") as url:
        yield url, folder, bos


def test_chat_matches_offline_streaming_or_not(family):
    url, folder, bos = family
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
    tokens = httpx.post(f"{url}/tokenize", json={"messages": CHAT}).json()["tokens"]
    tokenizer = load_tokenizer(folder)
    assert tokens[0] == tokenizer.bos_token_id and tokens[1] != tokenizer.bos_token_id  # the template's BOS only
    assert tokenizer.decode(tokens, skip_special_tokens=False).startswith(bos)
    offline = LLM(str(folder), num_kv_blocks=64).generate([tokens], SamplingParams(temperature=0, max_tokens=12))
    expected = offline[0].outputs[0]
    out = client.chat.completions.create(model=str(folder), messages=CHAT, temperature=0, max_tokens=12)
    assert out.choices[0].message.content == expected.text
    assert out.usage.completion_tokens == len(expected.token_ids)
    assert out.usage.prompt_tokens == len(tokens)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=str(folder), messages=CHAT, temperature=0, max_tokens=12, stream=True) if c.choices)
    assert streamed == expected.text


def test_logits_match_transformers(family):
    """The folder's model against transformers' on a chat prompt tokenized with the real vocabulary."""
    from transformers import AutoModelForCausalLM

    from models.loader import load_model
    from tests.helpers import SingleSequence
    _, folder, _ = family
    ids = load_tokenizer(folder).encode("Hello there! How are you today?")
    ours = load_model(folder, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        expected = reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(SingleSequence(ours, len(ids)).feed(ids), expected, atol=1e-4, rtol=0)
