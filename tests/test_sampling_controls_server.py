"""Sampling controls through a real server: penalties, logit_bias, allowed_token_ids and bad_words reach the engine,
best_of returns the likeliest candidates, and every value out of range is a 400 naming its field with no block held
afterwards. The server runs a tiny random-weight Llama with the Llama-2 vocabulary: its logits are all within ±0.7,
so a bias of 2 makes a token the greedy choice and a penalty of 2 takes that back."""
import json

import httpx
import openai
import pytest

from models.tokenizer import load_tokenizer
from tests.helpers import assert_error, assert_idle, running_server, tiny_llama

MODEL = "tiny"
MAX_LOGPROBS, MAX_N, MAX_NUM_SEQS = 5, 6, 4
GREEDY = dict(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0, logprobs=0)
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def url(checkpoint):
    with running_server("--model", str(checkpoint), "--served-model-name", MODEL, "--num-kv-blocks", "64",
                        "--chat-template", "chatml", "--max-logprobs", str(MAX_LOGPROBS), "--max-n", str(MAX_N),
                        "--max-num-seqs", str(MAX_NUM_SEQS)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)


@pytest.fixture(scope="module")
def words(checkpoint) -> dict[str, int]:
    """Single-token words of the vocabulary, and their ids."""
    tokenizer = load_tokenizer(checkpoint)
    ids = {word: tokenizer.encode(word, add_special_tokens=False) for word in ("hello", "world", "sea")}
    assert all(len(tokens) == 1 for tokens in ids.values())
    return {word: tokens[0] for word, tokens in ids.items()}


VLLM_FIELDS = ("repetition_penalty", "allowed_token_ids", "bad_words")  # the SDK takes them as extra_body


def tokens(client, **fields) -> list[str]:
    """The greedy completion's tokens, with `fields` added to the request."""
    extra = {name: fields.pop(name) for name in VLLM_FIELDS if name in fields}
    return client.completions.create(**{**GREEDY, **fields}, extra_body=extra).choices[0].logprobs.tokens


def test_logit_bias_allowed_token_ids_and_bad_words_reach_the_engine(client, words):
    hello, world = str(words["hello"]), str(words["world"])
    assert tokens(client, logit_bias={hello: 100}) == [" hello"] * 4  # string keys are token ids
    assert tokens(client, logit_bias={hello: 100, world: 50}, bad_words=["hello"]) == [" world"] * 4
    sampled = tokens(client, temperature=1, seed=5, allowed_token_ids=[words["sea"], words["world"]], max_tokens=8)
    assert set(sampled) <= {" sea", " world"}


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_a_penalty_takes_back_a_generated_tokens_bias(client, words, penalty):
    biased = {str(words["hello"]): 2}
    assert tokens(client, logit_bias=biased)[:2] == [" hello", " hello"]
    penalized = tokens(client, logit_bias=biased, **{penalty: 2})
    assert penalized[0] == " hello" and " hello" not in penalized[1:]


def test_the_repetition_penalty_counts_the_prompt(client, words):
    biased = {str(words["hello"]): 2}
    assert tokens(client, prompt="hello", logit_bias=biased)[0] == " hello"
    assert " hello" not in tokens(client, prompt="hello", logit_bias=biased, repetition_penalty=10)


def test_best_of_returns_the_candidates_with_the_highest_summed_logprob(client):
    """Candidate i draws with seed + i, as choice i of n does: the same request with n = best_of shows every
    candidate and its log-probabilities."""
    common = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1, seed=11, logprobs=0,
                  extra_body={"ignore_eos": True})
    candidates = client.completions.create(n=4, **common).choices
    best = client.completions.create(n=2, best_of=4, **common)
    ranked = sorted(candidates, key=lambda c: -sum(c.logprobs.token_logprobs))
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1] and best.usage.completion_tokens == 16


def test_max_tokens_zero_with_echo_returns_the_prompt(client):
    out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=0, echo=True)
    assert out.choices[0].text == "Once upon a time" and out.usage.completion_tokens == 0


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=json.dumps(body), headers={"Content-Type": "application/json"},
                      timeout=60)


@pytest.mark.parametrize("path,fields,param", [
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, "top_logprobs"),  # the engine's
    ("/v1/chat/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/chat/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/completions", {"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
    ("/v1/completions", {"logprobs": MAX_LOGPROBS + 1, "stream": True}, "logprobs"),  # refused before the stream
    ("/v1/completions", {"prompt_logprobs": MAX_LOGPROBS + 1}, "prompt_logprobs"),
    ("/v1/completions", {"prompt_logprobs": -1}, "prompt_logprobs"),
    ("/v1/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"frequency_penalty": -3}, "frequency_penalty"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"logit_bias": {"hello": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"-5": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"5": -100.5}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"32000": 1}}, "logit_bias"),  # outside the vocabulary
    ("/v1/completions", {"logit_bias": {"32000": 1}, "stream": True}, "logit_bias"),
    ("/v1/completions", {"allowed_token_ids": [5, 32000]}, "allowed_token_ids"),
    ("/v1/completions", {"allowed_token_ids": []}, "allowed_token_ids"),
    ("/v1/completions", {"bad_words": [" "]}, "bad_words"),
    ("/v1/completions", {"best_of": 1, "n": 2}, "best_of"),
    ("/v1/completions", {"best_of": 2, "stream": True}, "best_of"),
    ("/v1/completions", {"best_of": MAX_N + 1}, "best_of"),  # the server's --max-n
    ("/v1/completions", {"best_of": MAX_NUM_SEQS + 1}, "best_of"),  # the engine's --max-num-seqs
])
def test_values_out_of_range_are_400s_naming_the_field(url, path, fields, param):
    base = CHAT if path == "/v1/chat/completions" else {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert_error(post(url, path, {**base, **fields}), 400, param=param)


def test_nothing_is_held_after_the_refusals(url):
    assert_idle(url)
