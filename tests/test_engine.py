"""The engine's request life cycle with the real default model."""
import pytest

from engine import LLM, SamplingParams
from tests.conftest import chat_prompt

GREEDY = SamplingParams(temperature=0, max_tokens=32)


@pytest.fixture(scope="module")
def small(default_model_path):
    """A short context and a small cache, to hit the limits quickly."""
    return LLM(str(default_model_path), max_model_len=64, num_kv_blocks=12, block_size=4)


def test_text_prompt_and_outputs(llm):
    out = llm.generate(chat_prompt("What is the capital of Japan?"), GREEDY)[0]
    assert "Tokyo" in out.outputs[0].text
    assert out.prompt_token_ids == llm.get_tokenizer().encode(chat_prompt("What is the capital of Japan?"))
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].token_ids[-1] == 2
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_requests_that_cannot_fit_are_refused_with_the_numbers(small):
    with pytest.raises(ValueError, match=r"60 tokens and max_tokens is 10, 70 in all: over the model's maximum "
                                         r"context length of 64"):
        small.engine.add_request([5] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match=r"the prompt has 50 tokens: over the KV cache's capacity of 48"):
        small.engine.add_request([5] * 50, SamplingParams(max_tokens=None))
    with pytest.raises(ValueError, match="over the KV cache's capacity of 48 tokens"):
        small.engine.add_request([5] * 40, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        small.engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small.engine.add_request([5, 49152], SamplingParams())
    assert not small.engine.has_unfinished_requests()


def test_a_refused_prompt_leaves_none_of_its_call_queued(small):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small.generate([[5, 6], [5, 49152]], GREEDY)
    assert not small.engine.has_unfinished_requests() and small.engine.pool.num_free == small.engine.pool.num_blocks


def test_max_tokens_none_fills_what_the_context_and_cache_leave(small):
    out = small.generate([list(range(100, 130))], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 48 - 30 and out[0].outputs[0].finish_reason == "length"


def test_abort_frees_blocks_whether_waiting_or_running(small):
    engine, params = small.engine, SamplingParams(temperature=0, max_tokens=8)
    running = engine.add_request(list(range(100, 120)), params)
    engine.add_request(list(range(200, 220)), params, request_id="second")
    waiting = engine.add_request(list(range(300, 320)), params)  # no room: stays waiting
    engine.step()
    assert engine.requests[waiting][0].status.value == "waiting"
    engine.abort(waiting)
    engine.abort(running)
    engine.abort("second")
    engine.abort("unknown")  # a no-op
    assert not engine.has_unfinished_requests()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_stop_string_cuts_the_text(llm):
    prompt = chat_prompt("Count from one to ten in words.")
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0].text
    stop = "4. 4"  # several tokens
    assert stop in full
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop, "never-seen"]))[0]
    assert out.outputs[0].text == full[:full.index(stop)]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop


def test_stop_token_ids_and_min_tokens(llm):
    prompt = chat_prompt("What is the capital of France?")
    natural = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
    stopped = llm.generate(prompt, SamplingParams(temperature=0, stop_token_ids=[natural[2]]))[0].outputs[0]
    assert stopped.token_ids == natural[:3] and stopped.stop_reason == natural[2]
    longer = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, min_tokens=len(natural) + 5))[0]
    assert len(longer.outputs[0].token_ids) >= len(natural) + 5
    assert 2 not in longer.outputs[0].token_ids[:len(natural) + 4]


def test_seeded_sampling_is_reproducible_in_any_batch(llm):
    prompt = chat_prompt("Write a haiku about the sea.")
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16)
    alone = llm.generate(prompt, seeded)[0].outputs[0].token_ids
    noise = SamplingParams(temperature=1.0, max_tokens=16)
    batch = llm.generate([chat_prompt("Hi"), prompt, chat_prompt("Tell me a joke.")], [noise, seeded, noise])
    assert batch[1].outputs[0].token_ids == alone
    other = llm.generate(prompt, SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16))
    assert other[0].outputs[0].token_ids != alone


def test_the_running_batch_is_never_seen_empty_while_scheduling(small, monkeypatch):
    """Metrics read `scheduler.running` from another thread: a step must not empty it on the way."""
    engine = small.engine
    for start in (100, 200):
        engine.add_request(list(range(start, start + 5)), SamplingParams(temperature=0, max_tokens=4))
    engine.step()
    seen, reserve = [], engine.scheduler._reserve
    monkeypatch.setattr(engine.scheduler, "_reserve",
                        lambda *args: seen.append(len(engine.scheduler.running)) or reserve(*args))
    engine.step()
    assert seen == [2, 2]
    while engine.has_unfinished_requests():
        engine.step()
