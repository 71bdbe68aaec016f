"""The README's contract: the same request with the same seed (or greedy) gives the same tokens whatever else runs
beside it. Each request runs alone on a real server with the default model, then again among 16 concurrent
unrelated ones (long prompts computed in chunks beside it, streams, other seeds), when its own prompt is cached."""
import concurrent.futures
import random
import time

import openai
import pytest

from tests.conftest import CHAT_QUESTIONS
from tests.helpers import assert_idle, running_server

LOAD = 16


@pytest.fixture(scope="module")
def url():
    with running_server() as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)


CASES = [dict(seed=seed, temperature=1.0, n=n) for seed, n in ((1, 1), (2, 1), (3, 2), (4, 3))] \
    + [dict(temperature=0, n=1)]


def _ask(client, case: dict) -> list[tuple[str, list[float]]]:
    """Each choice's text and its tokens' log-probabilities: equal tokens could hide logits that moved a little
    (a token changes only at a near-tie); equal log-probabilities, to the last bit, show that they did not move."""
    out = client.chat.completions.create(
        model=client.models.list().data[0].id, max_tokens=32, logprobs=True,
        messages=[{"role": "user", "content": CHAT_QUESTIONS[case.get("seed", 0) % len(CHAT_QUESTIONS)]}], **case)
    return [(choice.message.content, [entry.logprob for entry in choice.logprobs.content])
            for choice in sorted(out.choices, key=lambda c: c.index)]


def _unrelated(client, i: int) -> None:
    """Other work: every fourth a prompt of ~700 tokens (two chunks at the 512-token budget), some streamed, with
    seeds and lengths of their own."""
    words = " ".join(random.Random(i).choice(("river", "stone", "light", "number", "garden")) for _ in range(600))
    text = words if i % 4 == 0 else f"Tell me a story about item {i}."
    params = dict(model=client.models.list().data[0].id, prompt=text, max_tokens=8 + 5 * i, temperature=0.9, seed=100 + i)
    if i % 3 == 0:
        for _ in client.completions.create(stream=True, **params):
            pass
    else:
        client.completions.create(**params)


def test_seeded_and_greedy_outputs_do_not_depend_on_what_runs_beside_them(client, url):
    alone = [_ask(client, case) for case in CASES]
    with concurrent.futures.ThreadPoolExecutor(LOAD + len(CASES)) as pool:
        load = [pool.submit(_unrelated, client, i) for i in range(LOAD)]
        time.sleep(0.5)  # the requests under test arrive while the others are being computed
        together = [pool.submit(_ask, client, case) for case in CASES]
        results = [future.result() for future in together]
        for future in load:
            future.result()
    assert results == alone
    assert len({text for choices in alone for text, _ in choices}) == sum(case["n"] for case in CASES)
    assert_idle(url)
