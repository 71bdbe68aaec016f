"""`n` choices, the prefix cache's `cached_tokens`, `cache_salt` and per-key cache isolation, against real
`python -m server` processes running a tiny random-weight Llama: its prompts of a thousand tokens cost
milliseconds, and at temperature 1 its near-uniform next-token distribution makes every choice differ."""
import random
import threading
import time

import httpx
import openai
import pytest

from tests.helpers import assert_error, assert_idle, metrics, running_server, tiny_llama

MODEL = "tiny"
CONTEXT = 2048
MAX_N = 4
KEYS = ("tenant-one-key", "tenant-two-key")
LONG = 1000  # prompt tokens: 62 full blocks of 16, of which the cache serves all (the last token is recomputed)
SAMPLED = dict(model=MODEL, max_tokens=8, temperature=1, seed=7, extra_body={"ignore_eos": True})
_ids = random.Random(0)


def fresh_prompt(length: int = 24) -> list[int]:
    """Token ids no other request sent, so that the prefix cache holds nothing of them."""
    return [_ids.randrange(100, 31000) for _ in range(length)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny"), CONTEXT)


@pytest.fixture(scope="module")
def url(checkpoint):
    """No API keys; at most 4 choices a request."""
    with running_server("--model", str(checkpoint), "--served-model-name", MODEL, "--num-kv-blocks", "1024",
                        "--chat-template", "chatml", "--max-n", str(MAX_N)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)


@pytest.fixture(scope="module")
def keyed(checkpoint):
    """Two API keys (two tenants); four sequences run at once and six may wait; `n` up to 8, so that the engine's
    own limit (`--max-num-seqs`) is the one that refuses 5 to 8."""
    keys = [arg for key in KEYS for arg in ("--api-key", key)]
    with running_server("--model", str(checkpoint), "--served-model-name", MODEL, "--num-kv-blocks", "1024",
                        "--max-num-seqs", "4", "--max-queued-requests", "6", "--max-n", "8", *keys) as base:
        yield base


def tenant(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def streamed(chunks) -> tuple[dict[int, str], dict[int, list[str]], object]:
    """A completion stream's text and finish reasons by choice index, and its usage."""
    texts, finishes, usage = {}, {}, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            finishes.setdefault(choice.index, []).extend([choice.finish_reason] if choice.finish_reason else [])
    return texts, finishes, usage


def cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def test_n_choices_are_distinct_reproducible_and_stream_alike(url, client):
    prompt = fresh_prompt()
    before = metrics(url)
    first = client.completions.create(prompt=prompt, n=3, **SAMPLED)
    after = metrics(url)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert {c.finish_reason for c in first.choices} == {"length"}
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (len(prompt), 3 * 8)  # the prompt once
    assert after["nanoserve:prompt_tokens_total"] - before["nanoserve:prompt_tokens_total"] == len(prompt)
    assert after["nanoserve:generation_tokens_total"] - before["nanoserve:generation_tokens_total"] == 3 * 8

    assert [c.text for c in client.completions.create(prompt=prompt, n=3, **SAMPLED).choices] == texts
    stream_texts, finishes, usage = streamed(client.completions.create(
        prompt=prompt, n=3, stream=True, stream_options={"include_usage": True}, **SAMPLED))
    assert stream_texts == dict(enumerate(texts))
    assert finishes == {i: ["length"] for i in range(3)}  # exactly one finish per choice
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), 3 * 8)


def test_a_choice_that_ends_first_gets_one_finish_while_its_siblings_run(client):
    """A stop string common in random text ends the choices after different numbers of tokens; the engine keeps
    sending a finished choice's final state, which the stream must not finish again."""
    kwargs = dict(prompt=fresh_prompt(), n=MAX_N, stop="e", **{**SAMPLED, "max_tokens": 24})
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, **kwargs))
    texts, finishes, _ = streamed(chunks)
    assert texts == {c.index: c.text for c in full.choices}
    assert finishes == {c.index: [c.finish_reason] for c in full.choices}
    first_finish = next(i for i, chunk in enumerate(chunks) if chunk.choices[0].finish_reason)
    assert any(chunk.choices[0].text for chunk in chunks[first_finish:]), "no choice outlived another"


def test_several_prompts_number_their_choices_prompt_times_n_plus_i(client):
    prompts = [fresh_prompt(), fresh_prompt()]
    alone = [[c.text for c in client.completions.create(prompt=p, n=2, **SAMPLED).choices] for p in prompts]
    together = client.completions.create(prompt=prompts, n=2, **SAMPLED)
    assert [(c.index, c.text) for c in together.choices] == list(enumerate(alone[0] + alone[1]))
    assert together.usage.prompt_tokens == sum(map(len, prompts)) and together.usage.completion_tokens == 4 * 8
    texts, finishes, _ = streamed(client.completions.create(prompt=prompts, n=2, stream=True, **SAMPLED))
    assert texts == dict(enumerate(alone[0] + alone[1])) and finishes == {i: ["length"] for i in range(4)}


def test_a_chat_stream_gives_every_choice_its_role_and_one_finish(client):
    messages = [{"role": "user", "content": "Tell me something."}]
    full = client.chat.completions.create(messages=messages, n=2, **SAMPLED)
    chunks = list(client.chat.completions.create(messages=messages, n=2, stream=True,
                                                 stream_options={"include_usage": True}, **SAMPLED))
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chunks[:2]] == [(0, "assistant"), (1, "assistant")]
    texts, finishes = {0: "", 1: ""}, {0: [], 1: []}
    for chunk in chunks[2:-1]:
        (choice,) = chunk.choices
        assert choice.delta.role is None
        texts[choice.index] += choice.delta.content or ""
        finishes[choice.index] += [choice.finish_reason] if choice.finish_reason else []
    assert texts == {c.index: c.message.content for c in full.choices} and len(set(texts.values())) == 2
    assert finishes == {0: ["length"], 1: ["length"]}
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 2 * 8


@pytest.mark.parametrize("path,n", [("/v1/completions", MAX_N + 1), ("/v1/chat/completions", MAX_N + 1),
                                    ("/v1/completions", 0), ("/v1/completions", -1), ("/v1/completions", 1.5),
                                    ("/v1/completions", "2"), ("/v1/completions", True)])
def test_n_outside_its_range_is_a_400_naming_n(url, path, n):
    body = {"model": MODEL, "n": n, "max_tokens": 2,
            **({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})}
    assert_error(httpx.post(f"{url}{path}", json=body, timeout=30), 400, "invalid_request", "n")


@pytest.mark.parametrize("salt", ["", "x" * 1025, 5, ["a"]], ids=["empty", "too-long", "number", "list"])
def test_a_bad_cache_salt_is_a_400_naming_it(url, salt):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "cache_salt": salt}
    assert_error(httpx.post(f"{url}/v1/completions", json=body, timeout=30), 400, "invalid_request", "cache_salt")


def test_a_repeated_long_prompt_reports_its_cached_tokens(url, client):
    prompt, kwargs = fresh_prompt(LONG), dict(model=MODEL, max_tokens=4, temperature=0)
    before = metrics(url)
    cold = client.completions.create(prompt=prompt, **kwargs)
    warm = client.completions.create(prompt=prompt, **kwargs)
    *_, usage = streamed(client.completions.create(prompt=prompt, stream=True, stream_options={"include_usage": True},
                                                   **kwargs))
    assert (cached(cold.usage), cold.usage.prompt_tokens) == (0, LONG)
    assert cached(warm.usage) >= 960 and cached(usage) >= 960
    assert warm.choices[0].text == cold.choices[0].text
    after = metrics(url)
    assert after["nanoserve:prefix_cache_queries_total"] - before["nanoserve:prefix_cache_queries_total"] >= 3 * 960
    assert after["nanoserve:prefix_cache_hits_total"] - before["nanoserve:prefix_cache_hits_total"] >= 2 * 960
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert isinstance(cached(chat.usage), int)  # on every answer, chat's too


def test_only_requests_with_the_same_cache_salt_share_cached_blocks(client):
    prompt = fresh_prompt(LONG)

    def salted(salt: str | None) -> int:
        extra = None if salt is None else {"cache_salt": salt}
        return cached(client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_body=extra).usage)
    assert salted("alice") == 0
    assert salted("bob") == 0
    assert salted(None) == 0
    assert salted("alice") >= 960 and salted(None) >= 960


def test_an_aborted_stream_of_n_choices_frees_every_block(url):
    before = metrics(url).get('nanoserve:request_success_total{finished_reason="abort"}', 0)
    body = {"model": MODEL, "prompt": fresh_prompt(), "n": 3, "max_tokens": 1500, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()  # held: see test_server.test_disconnect_mid_stream_frees_every_block
        for _ in range(12):
            next(lines)
    assert_idle(url)
    assert metrics(url)['nanoserve:request_success_total{finished_reason="abort"}'] - before == 3  # each choice


def test_each_api_key_has_a_cache_of_its_own(keyed):
    one, two = tenant(keyed, KEYS[0]), tenant(keyed, KEYS[1])
    prompt = fresh_prompt(LONG)

    def hits(client: openai.OpenAI, **extra) -> int:
        return cached(client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_body=extra).usage)
    assert hits(one) == 0
    assert hits(two) == 0  # one tenant cannot time another's prompts
    assert hits(one) >= 960 and hits(two) >= 960
    assert hits(one, cache_salt="s") == 0 and hits(one, cache_salt="s") >= 960


def test_n_beyond_the_engines_sequences_is_a_400_naming_n(keyed):
    body = {"model": MODEL, "prompt": "hi", "n": 5, "max_tokens": 2}
    response = httpx.post(f"{keyed}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEYS[0]}"},
                          timeout=30)
    assert_error(response, 400, "invalid_request", "n")


def test_n_times_prompts_count_against_the_queue(keyed):
    """A stream of 4 choices holds every sequence slot; a request of 4 more waits (4 of the 6 queue places); one
    of 3 does not fit beside it (429). A single request of 2 prompts times 4 could never fit (400)."""
    auth = {"Authorization": f"Bearer {KEYS[0]}"}

    def post(**fields) -> httpx.Response:
        return httpx.post(f"{keyed}/v1/completions", json={"model": MODEL, "max_tokens": 4, **fields}, headers=auth,
                          timeout=120)
    assert_error(post(prompt=[fresh_prompt(), fresh_prompt()], n=4), 400, "too_many_prompts", "n")
    hold = {"model": MODEL, "prompt": fresh_prompt(), "n": 4, "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{keyed}/v1/completions", json=hold, headers=auth, timeout=120) as holder:
        lines = holder.iter_lines()
        next(lines)
        waiting = []
        waiter = threading.Thread(target=lambda: waiting.append(post(prompt=fresh_prompt(), n=4)))
        waiter.start()
        deadline = time.monotonic() + 30
        while not metrics(keyed).get("nanoserve:num_requests_waiting"):
            assert waiter.is_alive() and time.monotonic() < deadline, waiting and waiting[0].text
            time.sleep(0.02)
        assert_error(post(prompt=fresh_prompt(), n=3), 429, "rate_limit_exceeded")
    waiter.join()
    assert waiting[0].status_code == 200 and len(waiting[0].json()["choices"]) == 4
    assert_idle(keyed)
