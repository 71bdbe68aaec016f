"""What a careless caller of the offline API can throw at the engine, with the real default model: bad token ids,
odd sampling values, huge stop lists, interrupts, aborts from other threads, a request that fails mid-step. The
engine refuses what it cannot run, never leaks blocks, and one request's trouble is never another's."""
import asyncio
import threading

import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.async_engine import AsyncLLMEngine, RequestFailedError
from engine.params import MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS, ParamError
from engine.stop import StopPattern

GREEDY = SamplingParams(temperature=0, max_tokens=4)


@pytest.fixture(scope="module")
def llm(default_model_path):
    return LLM(str(default_model_path), max_model_len=128, num_kv_blocks=64, block_size=4)


def assert_clean(llm) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests() and not engine.requests
    assert engine.pool.num_free == engine.pool.num_blocks


@pytest.mark.parametrize("prompt", [[[504.0, 3458, 314]], np.array([504.0, 3458.0, 314.0]), [[504, True, 314]]],
                         ids=["floats", "numpy-floats", "bool"])
def test_token_ids_that_are_not_whole_numbers_are_refused(llm, prompt):
    with pytest.raises(ValueError, match="whole numbers"):
        llm.generate(prompt, GREEDY)
    assert_clean(llm)
    assert llm.generate(np.array([504, 3458, 314]), GREEDY)[0].outputs[0].token_ids  # numpy ints are ids


def test_a_float_prompt_through_the_async_engine_is_refused_and_the_loop_goes_on(llm):
    engine = AsyncLLMEngine(llm.engine)

    async def run(prompt):
        return [out async for out in engine.generate(prompt, GREEDY)]
    try:
        with pytest.raises(ValueError, match="whole numbers"):
            asyncio.run(run([504.0, 3458, 314]))
        assert asyncio.run(run([504, 3458, 314]))[-1].finished
        assert engine.alive
    finally:
        engine.stop()
    assert_clean(llm)


def test_a_request_that_fails_mid_step_ends_alone(llm, monkeypatch):
    engine = llm.engine
    healthy = engine.add_request([504, 3458, 314], GREEDY)
    broken = engine.add_request([504, 3458, 315], GREEDY)

    def fail(*_, **__):
        raise RuntimeError("a fault in one request's detokenizer")
    monkeypatch.setattr(engine.requests[broken][0].detokenizer, "add_token", fail)
    finals = {}
    while engine.has_unfinished_requests():
        finals.update((out.request_id, out) for out in engine.step() if out.finished)
    assert finals[broken].outputs[0].finish_reason == "error"
    assert finals[healthy].outputs[0].finish_reason == "length" and len(finals[healthy].outputs[0].token_ids) == 4
    assert_clean(llm)


def test_a_request_that_fails_reaches_its_async_caller_as_an_error(llm, monkeypatch):
    monkeypatch.setattr(llm.engine, "_append_token", lambda *_: 1 / 0)
    engine = AsyncLLMEngine(llm.engine)

    async def run():
        return [out async for out in engine.generate([504, 3458, 314], GREEDY)]
    try:
        with pytest.raises(RequestFailedError):
            asyncio.run(run())
        assert engine.alive
    finally:
        engine.stop()
    assert_clean(llm)


def test_generate_leaves_nothing_queued_however_it_ends(llm, monkeypatch):
    with pytest.raises(TypeError):
        llm.generate([[504, 3458], None], GREEDY)
    assert_clean(llm)
    steps = 0
    step = llm.engine.step

    def interrupted_step():
        nonlocal steps
        steps += 1
        if steps == 2:
            raise KeyboardInterrupt
        return step()
    monkeypatch.setattr(llm.engine, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[504, 3458], [504, 3459]], SamplingParams(temperature=0, max_tokens=20))
    assert_clean(llm)


@pytest.mark.parametrize("fields,param", [
    ({"temperature": float("inf")}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": float("nan")}, "top_p"), ({"min_p": float("inf")}, "min_p"), ({"top_k": 2.5}, "top_k"),
    ({"max_tokens": 3.0}, "max_tokens"), ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"seed": 2**63}, "seed"), ({"seed": 2**64 - 1}, "seed"), ({"seed": -2**63 - 1}, "seed"),
    ({"stop": [""]}, "stop"), ({"stop": "x" * (MAX_STOP_CHARS + 1)}, "stop"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids"), ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids"),
])
def test_sampling_values_out_of_range_name_their_field(fields, param):
    with pytest.raises(ParamError) as refused:
        SamplingParams(**fields)
    assert refused.value.param == param


def test_chosen_request_ids_of_the_generated_shape_never_collide(llm):
    chosen = llm.engine.add_request([504, 3458], GREEDY, request_id="req-0")
    generated = llm.engine.add_request([504, 3458], GREEDY)
    assert chosen != generated
    llm.engine.abort(chosen)
    llm.engine.abort(generated)
    assert_clean(llm)


def test_an_abort_from_another_thread_waits_for_the_step_in_progress(llm, monkeypatch):
    """The abort lands while the model runs; before, it removed the sequence under the step (a KeyError)."""
    engine = llm.engine
    request_id = engine.add_request([504, 3458], SamplingParams(temperature=0, max_tokens=50))
    execute = engine.runner.execute
    aborter = threading.Thread(target=engine.abort, args=(request_id,))

    def execute_while_aborting(batch):
        aborter.start()
        aborter.join(timeout=0.5)  # with the lock it waits for this step; without it, it ran at once
        return execute(batch)
    monkeypatch.setattr(engine.runner, "execute", execute_while_aborting)
    engine.step()
    aborter.join()
    assert_clean(llm)


def test_the_stop_ids_barred_by_min_tokens_are_built_once_not_each_step(llm, monkeypatch):
    """Per step the sampler gets the same tensor: no list of the stop ids is rebuilt and indexed anew."""
    engine, seen = llm.engine, []
    sampler = engine.sampler

    def recording_sampler(logits, requests):
        seen.extend(request.controls.min_tokens_banned for request in requests)
        return sampler(logits, requests)
    monkeypatch.setattr(engine, "sampler", recording_sampler)
    stop_ids = list(range(1000, 1000 + MAX_STOP_TOKEN_IDS))
    out = llm.generate([504, 3458], SamplingParams(temperature=0, min_tokens=6, max_tokens=8, stop_token_ids=stop_ids))
    assert len(out[0].outputs[0].token_ids) >= 6
    assert len(seen) == len(out[0].outputs[0].token_ids) and all(tensor is seen[0] for tensor in seen)
    assert set(seen[0].tolist()) == set(stop_ids) | set(engine.tokenizer.eos_token_ids)


def test_stop_strings_are_matched_without_building_anything_on_the_engine_thread(llm, monkeypatch):
    """The match tables are built with the parameters (by the server, off the engine thread), 4 bytes a character."""
    params = SamplingParams(temperature=0, max_tokens=8, stop=["zq" * (MAX_STOP_CHARS // 2), "never"])
    assert [p.border.itemsize * len(p.border) for p in params.stop_patterns] == [4 * MAX_STOP_CHARS, 4 * 5]
    built = []
    monkeypatch.setattr(StopPattern, "__init__", lambda *args: built.append(args))
    out = llm.generate([504, 3458], params)
    assert not built and len(out[0].outputs[0].token_ids) == 8
