"""A real `python -m server` process on 127.0.0.1, driven with the openai SDK and httpx as users do."""
import asyncio
import json

import httpx
import openai
import pytest

from engine import SamplingParams
from server.chat import render
from tests.helpers import assert_error, assert_idle, faults, metrics, running_server

KEY = "test-key-123"
MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of Japan?"}]


STEP_DELAY = 0.005  # seconds added to each step: 400 tokens take 2 s at least, however fast the machine decodes


@pytest.fixture(scope="module")
def base_url(default_model_path):
    with running_server("--model", str(default_model_path), "--served-model-name", MODEL, "--max-model-len", "512",
                        env={"NANOSERVE_API_KEY": KEY, **faults(NANOSERVE_STEP_DELAY=STEP_DELAY)}) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0)


def _post(base_url, path, body, key=KEY, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base_url}{path}", json=body, headers=headers, timeout=timeout)


def test_completion_with_usage_and_length_cut(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].finish_reason == "length" and "Paris" in out.choices[0].text
    assert out.usage.completion_tokens == 5 and out.usage.total_tokens == out.usage.prompt_tokens + 5


def test_completion_prompt_forms_keep_their_order(client, llm):
    ids = llm.get_tokenizer().encode("One, two, three,")
    out = client.completions.create(model=MODEL, prompt=[ids, ids[:2]], max_tokens=3, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    single = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert out.choices[0].text == single.choices[0].text
    texts = client.completions.create(model=MODEL, prompt=["Hello", "One, two, three,"], max_tokens=3, temperature=0)
    assert texts.choices[1].text == single.choices[0].text


def test_several_prompts_stream_as_one_response_per_choice(client):
    """Each choice's deltas, in their own order, add up to its text when not streamed; one finish per choice;
    usage sums both prompts."""
    prompts, kwargs = ["The capital of France is", "One, two, three,"], dict(model=MODEL, max_tokens=8, temperature=0)
    full = client.completions.create(prompt=prompts, **kwargs)
    chunks = list(client.completions.create(prompt=prompts, stream=True, stream_options={"include_usage": True},
                                            **kwargs))
    texts, finishes = ["", ""], [[], []]
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        finishes[choice.index] += [choice.finish_reason] if choice.finish_reason else []
    assert texts == [c.text for c in full.choices] and finishes == [[c.finish_reason] for c in full.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_stop_string(client):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0).choices[0]
    stop = base.text.strip()[:3]
    out = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop" and out.choices[0].model_extra["stop_reason"] == stop  # vLLM's
    assert out.choices[0].text == base.text[:base.text.index(stop)]


def test_streamed_text_never_shows_a_stop_string(base_url, client):
    prompt = "Count: 1, 2, 3, 4, 5, 6"
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    stop = base[3:9]  # spans several tokens
    chunks = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=stop, stream=True) if c.choices]
    assert "".join(chunks) == base[:3]  # all that was ever sent: no part of the stop string


def test_non_streaming_disconnect_aborts(base_url):
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 450, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # 450 steps take over 2 s (STEP_DELAY): the client leaves first
        _post(base_url, "/v1/completions", body, timeout=1)
    assert_idle(base_url)
    assert metrics(base_url)['nanoserve:request_success_total{finished_reason="abort"}'] >= 1


def test_chat_matches_the_offline_api(client, llm, default_model_path):
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40)
    assert out.id.startswith("chatcmpl-") and out.choices[0].message.role == "assistant"
    tokenizer = llm.get_tokenizer()
    prompt = render(tokenizer.chat_template, QUESTION, True, "<|im_start|>", "<|im_end|>")
    offline = llm.generate([tokenizer.encode(prompt, add_special_tokens=False)],
                           SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    assert out.choices[0].message.content == offline.text
    assert out.choices[0].finish_reason == offline.finish_reason == "stop"
    assert out.usage.completion_tokens == len(offline.token_ids)


def test_chat_stream_deltas(client):
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert all("usage" in c.model_fields_set and c.usage is None for c in chunks[:-1])  # null, as OpenAI sends


def test_concurrent_streams(base_url, client):
    prompts = ["Name a color.", "Name a fruit.", "Name a planet.", "Name an animal."]
    expected = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                               temperature=0, max_tokens=16).choices[0].message.content
                for p in prompts]

    async def stream(aclient, prompt):
        text = ""
        async for chunk in await aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=16,
                stream=True):
            text += chunk.choices[0].delta.content or ""
        return text

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(*(stream(aclient, p) for p in prompts))
    assert asyncio.run(main()) == expected


def test_auth(base_url):
    assert_error(_post(base_url, "/v1/completions", {"model": MODEL, "prompt": "hi"}, key=None), 401,
                  "invalid_api_key")
    assert_error(_post(base_url, "/v1/completions", {"model": MODEL, "prompt": "hi"}, key="wrong"), 401)
    assert_error(httpx.get(f"{base_url}/v1/models"), 401)
    assert httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"] \
        == MODEL
    assert httpx.get(f"{base_url}/health").status_code == 200
    assert httpx.get(f"{base_url}/metrics").status_code == 200


@pytest.mark.parametrize("body,status,code,param,text", [
    ({"model": "other", "prompt": "hi"}, 404, "model_not_found", "model", "other"),
    ({"model": MODEL, "prompt": "hi", "foo": 1}, 400, None, "foo", "unknown field 'foo'"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 21}, 400, None, "logprobs", "max_logprobs"),
    ({"model": MODEL, "prompt": "hi", "presence_penalty": 2.5}, 400, None, "presence_penalty", None),
    ({"model": MODEL, "prompt": "hi", "n": 17}, 400, None, "n", "more than this server allows (16)"),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, None, "temperature", None),
    ({"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400, None, "max_tokens", None),
    ({"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400, None, None, "stream_options"),
    ({"model": MODEL, "prompt": "word " * 600}, 400, "context_length_exceeded", "prompt", "512"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 600}, 400, "context_length_exceeded", "prompt", "600"),
    ({"model": MODEL, "prompt": [1, 2, 10 ** 9]}, 400, None, None, "vocabulary"),
    ({"model": MODEL, "prompt": ""}, 400, None, "prompt", "empty"),
])
def test_completion_errors(base_url, body, status, code, param, text):
    assert_error(_post(base_url, "/v1/completions", body), status, code, param, text)


def test_chat_content_parts_equal_plain_content(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of Japan?"}]}]
    a = client.chat.completions.create(model=MODEL, messages=parts, temperature=0, max_tokens=12)
    b = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_chat_errors(base_url):
    assert_error(_post(base_url, "/v1/chat/completions", {"model": MODEL, "messages": []}), 400, param="messages")
    assert_error(_post(base_url, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "tools": [{}]}),
                  400, text="tools")
    assert_error(_post(base_url, "/v1/chat/completions",
                        {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    ok = _post(base_url, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_completion_tokens": 2,
                                                  "user": "u1", "store": False, "metadata": {"a": "b"},
                                                  "service_tier": "auto"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_other_error_paths(base_url):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    assert_error(httpx.post(f"{base_url}/v1/completions", content=b"{bad json", headers=headers), 400,
                  text="not valid JSON")
    assert_error(httpx.get(f"{base_url}/v1/nothing", headers=headers), 404)
    assert_error(httpx.delete(f"{base_url}/v1/completions", headers=headers), 405)


def test_tokenize_and_detokenize(base_url, llm):
    out = _post(base_url, "/tokenize", {"model": MODEL, "prompt": "Hello world"}).json()
    assert out == {"tokens": llm.get_tokenizer().encode("Hello world"), "count": 2, "max_model_len": 512}
    chat = _post(base_url, "/tokenize", {"model": MODEL, "messages": QUESTION}).json()
    assert chat["tokens"][0] == 1 and chat["count"] == len(chat["tokens"])
    assert _post(base_url, "/detokenize", {"model": MODEL, "tokens": out["tokens"]}).json() == {"prompt": "Hello world"}
    assert_error(_post(base_url, "/detokenize", {"model": MODEL, "tokens": [-1]}), 400, param="tokens")
    assert_error(_post(base_url, "/detokenize", {"model": MODEL, "tokens": [1] * 513}), 400, param="tokens",
                 text="more than the context's 512")


def test_disconnect_mid_stream_frees_every_block(base_url):
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        # Hold the iterator: breaking out of a loop over `iter_lines()` finalizes httpx's generators, and
        # httpcore then closes the connection at once, while the response still says it is open.
        lines = response.iter_lines()
        for _ in range(7):
            next(lines)
        assert metrics(base_url)["nanoserve:num_requests_running"] == 1
    assert_idle(base_url)


def test_openapi_describes_the_bodies(base_url):
    schema = httpx.get(f"{base_url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"model", "prompt", "max_tokens", "stream", "top_k"} <= set(fields)
    assert "ChatCompletionRequest" in schema["components"]["schemas"]
    assert json.dumps(schema)
