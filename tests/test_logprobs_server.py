"""Log-probabilities through a real server running the default model, against `log_softmax` of transformers' logits
for the same tokens: chat's and the legacy completions shapes, streamed and whole, echo (lm-eval's loglikelihood
request: echo, logprobs, max_tokens 0) and vLLM's prompt_logprobs. And the token bytes these shapes show, for a
byte-level BPE vocabulary and a SentencePiece one."""
import json

import httpx
import openai
import pytest
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from models.tokenizer import load_tokenizer
from tests.helpers import VOCAB, running_server

MODEL = "SmolLM2-135M-Instruct"
TOLERANCE = 1e-3  # logprobs of our float32 engine against transformers' on the same GGUF weights
TOP = 5
QUESTION = [{"role": "user", "content": "Write one sentence about the sea."}]
SAMPLED = dict(model=MODEL, max_tokens=10, temperature=0.7, seed=3)  # logprobs are the raw ones: not at 0.7
EOS = "<|im_end|>"  # a choice's last token when it stops, which its text leaves out
TEXTS = ["Hello world", "Ünïcödé: café, 日本語のテキスト", "emoji 🎉🚀 and 👨‍👩‍👧‍👦 🇫🇷", "\u00a0non-breaking"]


@pytest.fixture(scope="module")
def url(default_model_path):
    with running_server("--model", str(default_model_path), "--served-model-name", MODEL,
                        "--max-model-len", "512", "--quantization", "none", "--dtype", "float32") as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)


@pytest.fixture(scope="module")
def id_of_bytes(hf_tokenizer) -> dict[bytes, int]:
    """Each token's bytes to its id, from transformers' byte-level token strings: an oracle independent of ours."""
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    tokens = hf_tokenizer.convert_ids_to_tokens(list(range(len(hf_tokenizer))))
    return {bytes(byte_of[c] for c in token) if all(c in byte_of for c in token) else token.encode(): i
            for i, token in enumerate(tokens)}


@pytest.fixture(scope="module")
def id_of_string(id_of_bytes) -> dict[str, int]:
    return {data.decode("utf-8", errors="replace"): i for data, i in id_of_bytes.items()}


@pytest.fixture(scope="module")
def reference(hf_model):
    """Token ids -> transformers' log-probabilities of the next token at each position, [len(ids), vocab]."""
    def log_probs(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return hf_model(torch.tensor([ids])).logits[0].log_softmax(dim=-1)
    return log_probs


def tokenize(url: str, **body) -> list[int]:
    return httpx.post(f"{url}/tokenize", json={"model": MODEL, **body}).json()["tokens"]


def events(url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def assert_entry(row: torch.Tensor, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
    """One position's token, and its most likely tokens in order, against the reference's log-probabilities. The
    i-th value must be the reference's i-th best: order and identity agree up to ties within the tolerance."""
    assert abs(row[token].item() - logprob) < TOLERANCE, (token, row[token].item(), logprob)
    best = row.topk(len(top)).values.tolist()
    for (token_id, value), expected in zip(top, best):
        assert abs(value - expected) < TOLERANCE and abs(row[token_id].item() - value) < TOLERANCE, (top, best)


def assert_chat_content(content: list[dict], prompt: list[int], reference, id_of_bytes, top: int) -> None:
    ids = [id_of_bytes[bytes(entry["bytes"])] for entry in content]
    rows = reference(prompt + ids)[len(prompt) - 1:]
    for row, token, entry in zip(rows, ids, content):
        assert entry["token"] == bytes(entry["bytes"]).decode("utf-8", errors="replace")
        assert len(entry["top_logprobs"]) == top
        assert_entry(row, token, entry["logprob"],
                     [(id_of_bytes[bytes(t["bytes"])], t["logprob"]) for t in entry["top_logprobs"]])


def assert_legacy(logprobs: dict, prompt: list[int], echo: bool, reference, id_of_string, top: int) -> None:
    """A completion's legacy logprobs, with echo the prompt's tokens first: the first of them null, every other token
    scored by the position before it."""
    ids = [id_of_string[token] for token in logprobs["tokens"]]
    shown_from = 0 if echo else len(prompt)  # the position of the first token shown
    assert ids[:len(prompt) - shown_from] == prompt[shown_from:]
    rows = reference(prompt + ids[len(prompt) - shown_from:])
    for at, (token, value, alternatives) in enumerate(
            zip(ids, logprobs["token_logprobs"], logprobs["top_logprobs"]), shown_from):
        if at == 0:
            assert value is None and alternatives is None
            continue
        assert alternatives[logprobs["tokens"][at - shown_from]] == value  # the chosen token is in its map
        ranked = sorted(alternatives.items(), key=lambda item: -item[1])[:top]
        assert_entry(rows[at - 1], token, value, [(id_of_string[text], lp) for text, lp in ranked])
    lengths = [len(token) for token in logprobs["tokens"]]
    assert logprobs["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]


def test_token_bytes_of_a_byte_level_vocabulary(default_model_path, id_of_bytes):
    ours = load_tokenizer(default_model_path)
    assert all(ours.token_bytes(i) == data for data, i in id_of_bytes.items())
    for text in TEXTS:
        ids = ours.encode(text)
        assert b"".join(map(ours.token_bytes, ids)) == text.encode()
    pieces = [ours.token_bytes(i) for i in ours.encode("🎉")]
    assert len(pieces) > 1 and b"".join(pieces) == "🎉".encode()  # one character split between tokens


def test_token_bytes_of_a_sentencepiece_vocabulary():
    """Byte-fallback tokens are their one byte, pieces keep the space their "▁" stands for (the text's first one
    included, which decoding drops)."""
    ours = load_tokenizer(VOCAB / "ggml-vocab-llama-spm.gguf")
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert b"".join(map(ours.token_bytes, ids)) == (" " + text).encode()
    ids = ours.encode("日本語🚀", add_special_tokens=False)
    byte_tokens = [i for i in ids if ours.token_text(i).startswith("<0x")]
    assert byte_tokens and all(len(ours.token_bytes(i)) == 1 for i in byte_tokens)
    assert ours.token_bytes(ours.bos_token_id) == b"<s>"


def test_chat_logprobs_match_transformers(url, client, reference, id_of_bytes):
    out = client.chat.completions.create(messages=QUESTION, logprobs=True, top_logprobs=TOP, **SAMPLED)
    choice = out.choices[0]
    content = [entry.model_dump() for entry in choice.logprobs.content]
    assert len(content) == out.usage.completion_tokens and choice.logprobs.refusal is None
    assert_chat_content(content, tokenize(url, messages=QUESTION), reference, id_of_bytes, TOP)
    text = b"".join(bytes(entry["bytes"]) for entry in content).decode()
    assert text.removesuffix(EOS) == choice.message.content


def test_chat_stream_chunks_carry_their_tokens_logprobs(url, reference, id_of_bytes):
    body = {"messages": QUESTION, "logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True},
            **SAMPLED}
    chunks = events(url, "/v1/chat/completions", body)
    content, text = [], ""
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        text += choice["delta"].get("content", "")
        entries = (choice["logprobs"] or {"content": []})["content"]
        assert entries or not choice["delta"].get("content")  # text comes only with the tokens that made it
        content += entries
    assert len(content) == chunks[-1]["usage"]["completion_tokens"]
    assert b"".join(bytes(entry["bytes"]) for entry in content).decode().removesuffix(EOS) == text
    assert_chat_content(content, tokenize(url, messages=QUESTION), reference, id_of_bytes, 2)


def test_completion_logprobs_match_transformers(url, client, reference, id_of_string):
    prompt = "The sea is"
    out = client.completions.create(prompt=prompt, logprobs=TOP, **SAMPLED)
    logprobs = out.choices[0].logprobs.model_dump()
    assert len(logprobs["tokens"]) == out.usage.completion_tokens
    assert_legacy(logprobs, tokenize(url, prompt=prompt), False, reference, id_of_string, TOP)


def test_streamed_echo_sends_the_prompt_first_then_each_chunks_tokens(url, reference, id_of_string):
    prompt = "The sea is"
    chunks = events(url, "/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 2, **SAMPLED})
    first = chunks[0]["choices"][0]
    assert first["text"] == prompt and first["logprobs"]["token_logprobs"][0] is None
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for name, values in (chunk["choices"][0]["logprobs"] or {}).items():
            merged[name] += values
    ids = tokenize(url, prompt=prompt)
    # English text: no character is split between tokens
    assert "".join(c["choices"][0]["text"] for c in chunks) == "".join(merged["tokens"]).removesuffix(EOS)
    assert_legacy(merged, ids, True, reference, id_of_string, 2)


def test_echo_scores_a_text_as_lm_eval_asks(url, client, reference, id_of_string):
    """echo, logprobs and max_tokens 0: the prompt's tokens, the first null, each scored by the ones before it;
    vLLM's prompt_logprobs alike, a map per position that holds the prompt's token and the most likely ones."""
    prompt = "The quick brown fox jumps over the lazy dog"
    out = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=3, max_tokens=0,
                                    extra_body={"prompt_logprobs": 2})
    choice, ids = out.choices[0].model_dump(), tokenize(url, prompt=prompt)
    assert choice["text"] == prompt and choice["finish_reason"] == "length" and out.usage.completion_tokens == 0
    assert_legacy(choice["logprobs"], ids, True, reference, id_of_string, 3)
    assert len(choice["logprobs"]["tokens"]) == len(ids)
    rows = reference(ids)
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == len(ids)
    for position, (token, ranked) in enumerate(zip(ids[1:], choice["prompt_logprobs"][1:]), 1):
        own = ranked[str(token)]
        top = sorted((entry["rank"], int(t), entry["logprob"]) for t, entry in ranked.items() if entry["rank"] <= 2)
        assert [rank for rank, _, _ in top] == [1, 2] and list(ranked)[0] == str(token)
        more_likely = [int((rows[position - 1] > own["logprob"] + margin).sum()) for margin in (1e-3, -1e-3)]
        assert more_likely[0] < own["rank"] <= more_likely[1] + 1
        assert own["decoded_token"] == choice["logprobs"]["tokens"][position]
        assert_entry(rows[position - 1], token, own["logprob"], [(t, logprob) for _, t, logprob in top])


def test_echo_of_split_characters_shows_replacement_strings_at_the_characters_offset(client):
    prompt = "Emoji 🆗 ok"
    out = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=0, max_tokens=0)
    logprobs = out.choices[0].logprobs
    assert "\ufffd" in logprobs.tokens and logprobs.tokens[-1] == " ok"
    assert logprobs.text_offset[-1] == prompt.index(" ok") and logprobs.text_offset == sorted(logprobs.text_offset)


def test_chat_prompt_logprobs_are_the_responses(url, reference):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 1, "prompt_logprobs": 0}
    out = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    ids = tokenize(url, messages=QUESTION)
    assert out["choices"][0]["logprobs"] is None and out["prompt_logprobs"][0] is None
    rows = reference(ids)
    for position, ranked in enumerate(out["prompt_logprobs"][1:], 1):
        assert list(ranked) == [str(ids[position])]
        assert_entry(rows[position - 1], ids[position], ranked[str(ids[position])]["logprob"], [])
