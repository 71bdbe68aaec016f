"""Load against a real server: 200 streaming requests, 50 at a time, a quarter of them dropped by their
client mid-stream at random points. Every other request gets exactly the text it gets alone, the server
stays healthy, and afterwards nothing runs, nothing waits and every KV block is free."""
import asyncio
import random

import httpx
import openai
import pytest

from tests.helpers import assert_idle, metrics, running_server

MODEL = "smol"
PROMPTS = [f"Write one sentence about {topic}." for topic in (
    "the sea", "mountains", "a cat", "bread", "the moon", "trains", "winter", "music", "a garden", "rain")]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def url(default_model_path):
    with running_server("--model", str(default_model_path), "--served-model-name", MODEL,
                        "--max-model-len", "512") as base:
        yield base


async def _stream(client: openai.AsyncOpenAI, prompt: str, drop_after: int | None) -> str | None:
    """The streamed text, or None when this client walked away after `drop_after` chunks."""
    stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                  temperature=0, max_tokens=MAX_TOKENS, stream=True)
    text, finish = "", None
    async for i, chunk in _enumerate(stream):
        if drop_after is not None and i == drop_after:
            await stream.close()
            return None
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish in ("stop", "length")
    return text


async def _enumerate(stream):
    i = 0
    async for item in stream:
        yield i, item
        i += 1


def test_200_streams_50_at_a_time_with_a_quarter_dropped(url):
    sync = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    alone = {p: sync.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], temperature=0,
                                             max_tokens=MAX_TOKENS).choices[0].message.content for p in PROMPTS}
    rng = random.Random(0)
    plan = [(PROMPTS[i % len(PROMPTS)], rng.randint(1, MAX_TOKENS - 2) if i % 4 == 0 else None) for i in range(200)]
    rng.shuffle(plan)
    aborted_before = metrics(url).get('nanoserve:request_success_total{finished_reason="abort"}', 0)

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
        gate = asyncio.Semaphore(50)

        async def one(prompt, drop_after):
            async with gate:
                return await _stream(client, prompt, drop_after)
        return await asyncio.gather(*(one(p, d) for p, d in plan))
    texts = asyncio.run(main())

    completed = [(prompt, text) for (prompt, drop), text in zip(plan, texts) if drop is None]
    assert len(completed) == 150 and all(text == alone[prompt] for prompt, text in completed)
    assert httpx.get(f"{url}/health").status_code == 200
    assert_idle(url)
    assert metrics(url)['nanoserve:request_success_total{finished_reason="abort"}'] - aborted_before >= 1
