"""Prefix caching, chunked prefill and n choices, with the real default model through the engine.

Engines here differ only in their scheduling and cache settings, so they share one loaded model (loading it
takes seconds; the model holds no per-request state).
"""
import functools

import pytest

import engine.runner
from engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, seed=7, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def make_llm(default_model_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.runner, "load_model", functools.cache(engine.runner.load_model))
        yield lambda **args: _counting(LLM(str(default_model_path), **{"num_kv_blocks": 400, **args}))


def _counting(llm: LLM) -> LLM:
    """Record the tokens each step computes (`llm.steps`: one list of per-sequence counts per step)."""
    llm.steps = []
    execute = llm.engine.runner.execute

    def counted(batch):
        llm.steps.append(list(batch.num_new_tokens))
        return execute(batch)
    llm.engine.runner.execute = counted
    return llm


def _computed(llm: LLM) -> int:
    total = sum(map(sum, llm.steps))
    llm.steps.clear()
    return total


def _tokens(outputs) -> list[list[int]]:
    return [c.token_ids for o in outputs for c in o.outputs]


def _prompts(count: int, shared: int, own: int) -> list[list[int]]:
    """`count` prompts that begin with the same `shared` tokens and end in `own` tokens of their own."""
    return [[1000 + i for i in range(shared)] + [5000 + 37 * p + i for i in range(own)] for p in range(count)]


def _held_nowhere(llm: LLM) -> bool:
    """No request holds a block: every one is empty or cached, free to take."""
    pool = llm.engine.pool
    return pool.num_free == pool.num_blocks and pool.usage == 0


# Each block size the tests use; all four settings with the default size, the two extremes with the others.
SETTINGS = [dict(enable_prefix_caching=cache, enable_chunked_prefill=chunks) for cache in (False, True)
            for chunks in (False, True)]


@pytest.mark.parametrize("block_size,settings", [(16, SETTINGS), (1, SETTINGS[::3]), (3, SETTINGS[::3])])
def test_outputs_are_the_same_with_the_cache_and_chunks_on_and_off(make_llm, block_size, settings):
    """Prompts sharing 40 tokens, greedy, then seeded (which finds them cached): the same tokens as without the
    cache and without chunks (chunks of 32 tokens cut every prompt)."""
    prompts = _prompts(4, 40, 9)
    results = []
    for setting in settings:
        budget = 32 if setting["enable_chunked_prefill"] else None
        llm = make_llm(block_size=block_size, max_model_len=256, max_num_batched_tokens=budget, **setting)
        results.append([_tokens(llm.generate(prompts, params)) for params in (GREEDY, SEEDED)])
        assert _held_nowhere(llm)
    assert all(r == results[0] for r in results[1:])


def test_a_repeated_long_prompt_computes_only_its_last_block(make_llm):
    llm = make_llm()
    prompt = _prompts(1, 0, 1000)[0]
    first = llm.generate(prompt, GREEDY)[0]
    assert first.num_cached_tokens == 0 and _computed(llm) == 1000 + 11
    second = llm.generate(prompt, GREEDY)[0]
    assert second.num_cached_tokens == 992 and _computed(llm) == 8 + 11  # 62 of its 63 blocks; 8 tokens left
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    scheduler = llm.engine.scheduler
    assert (scheduler.prefix_cache_queries, scheduler.prefix_cache_hits) == (2000, 992)


def test_a_fully_cached_prompt_computes_its_last_block_again(make_llm):
    llm = make_llm()
    prompt = _prompts(1, 0, 64)[0]  # four full blocks
    llm.generate(prompt, GREEDY)
    _computed(llm)
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 48 and _computed(llm) == 16 + 11


def test_eviction_under_pressure_keeps_outputs_and_frees_every_block(make_llm):
    """Twelve prompts of 100 tokens through a cache of 640 tokens, in chunks of 64: preemption (mid-prefill too)
    and eviction, and the same tokens as each prompt alone. Afterwards nothing is held; the last prompt's blocks are still cached, the first's not."""
    prompts = _prompts(12, 20, 80)
    roomy = make_llm(enable_prefix_caching=False)
    alone = [_tokens(roomy.generate(p, GREEDY))[0] for p in prompts]
    llm = make_llm(num_kv_blocks=40, max_num_batched_tokens=64)
    scheduler, preempted_in_prefill = llm.engine.scheduler, []
    preempt = scheduler._preempt

    def recording_preempt(seq):
        preempted_in_prefill.append(0 < seq.num_computed_tokens < len(seq.prompt_token_ids))
        preempt(seq)
    scheduler._preempt = recording_preempt
    assert _tokens(llm.generate(prompts, GREEDY)) == alone
    assert any(preempted_in_prefill) and _held_nowhere(llm)
    assert llm.generate(prompts[-1], GREEDY)[0].num_cached_tokens == 96
    assert llm.generate(_prompts(1, 0, 100)[0], GREEDY)[0].num_cached_tokens == 0


def test_requests_share_cached_blocks_only_with_the_same_salt(make_llm):
    llm = make_llm()
    prompt = _prompts(1, 0, 64)[0]

    def cached(salt):
        llm.engine.add_request(prompt, GREEDY, request_id="r", cache_salt=salt)
        while llm.engine.has_unfinished_requests():
            finished = [o for o in llm.engine.step() if o.finished]
        return finished[0].num_cached_tokens
    assert cached("tenant-a") == 0
    assert (cached("tenant-b"), cached(None), cached("tenant-a"), cached("tenant-b")) == (0, 0, 48, 48)


def test_running_streams_keep_decoding_while_a_long_prompt_is_prefilled(make_llm):
    """Four streams decode; a 3,000-token prompt arrives. Every step of its prefill also decodes the four, and
    it takes its chunks from what the budget leaves."""
    llm = make_llm(max_num_batched_tokens=512)
    engine, streaming = llm.engine, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i, prompt in enumerate(_prompts(4, 0, 10)):
        engine.add_request(prompt, streaming, request_id=f"stream-{i}")
    for _ in range(3):
        engine.step()
    llm.steps.clear()
    engine.add_request(_prompts(1, 0, 3000)[0], SamplingParams(temperature=0, max_tokens=1), request_id="long")
    while not any(o.request_id == "long" and o.finished for o in engine.step()):
        pass
    assert len(llm.steps) == 6  # 3,000 tokens in chunks of 512 - 4
    assert all(step == [508, 1, 1, 1, 1] for step in llm.steps[:-1]) and llm.steps[-1] == [3000 - 5 * 508, 1, 1, 1, 1]
    for request_id in [f"stream-{i}" for i in range(4)]:
        engine.abort(request_id)
    assert _held_nowhere(llm)


def test_a_prompt_longer_than_the_budget_is_refused_without_chunked_prefill(make_llm):
    with pytest.raises(ValueError, match="without chunked prefill"):
        make_llm(max_num_batched_tokens=64, enable_chunked_prefill=False)


def test_n_choices_share_their_prompt_and_are_each_reproducible(make_llm):
    """Three seeded choices: each reproducible, different from the others, choice 0 as a request of n = 1
    with the same seed. The prompt is computed once (the further choices copy its partial last block), and every
    choice computes its own 11 decode tokens."""
    llm = make_llm()
    prompt, params = _prompts(1, 0, 40)[0], SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12,
                                                            ignore_eos=True)
    first = llm.generate(prompt, params)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2] and first.finished
    assert _computed(llm) == 40 + 3 * 11
    again = _tokens(llm.generate(prompt, params))
    assert again == _tokens([first]) and len({tuple(t) for t in again}) == 3
    single = SamplingParams(temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    assert _tokens(llm.generate(prompt, single)) == again[:1]
    greedy = _tokens(llm.generate(prompt, SamplingParams(n=4, temperature=0, max_tokens=12, ignore_eos=True)))
    assert all(t == greedy[0] for t in greedy)


# Four choices of 69 tokens in 8 blocks: copies of the prompt's partial block, then preemption. Two choices of 48
# tokens in 3 blocks: no block is free for the copy when the prompt is done, so the second choice computes the
# partial block's tokens again, once it has room.
@pytest.mark.parametrize("n,prompt_len,max_tokens,num_blocks", [(4, 45, 24, 8), (2, 40, 8, 3)])
def test_n_choices_under_preemption_draw_as_with_room(make_llm, n, prompt_len, max_tokens, num_blocks):
    params = SamplingParams(n=n, temperature=1.0, seed=3, max_tokens=max_tokens, ignore_eos=True)
    prompt = _prompts(1, 0, prompt_len)[0]
    roomy = _tokens(make_llm().generate(prompt, params))
    tight = make_llm(num_kv_blocks=num_blocks)
    assert _tokens(tight.generate(prompt, params)) == roomy
    assert tight.engine.scheduler.num_preemptions > 0 and _held_nowhere(tight)


def test_aborting_a_request_frees_every_choice(make_llm):
    llm = make_llm()
    engine = llm.engine
    engine.add_request(_prompts(1, 0, 40)[0], SamplingParams(n=3, max_tokens=50, ignore_eos=True), request_id="r")
    for _ in range(4):
        outputs = engine.step()
    assert len(outputs[0].outputs) == 3 and not outputs[0].finished and engine.pool.usage > 0
    engine.abort("r")
    assert _held_nowhere(llm) and not engine.has_unfinished_requests() and not engine.requests


def test_more_choices_than_seats_are_refused(make_llm):
    with pytest.raises(ValueError, match="n is 3: more sequences than the 2 a batch runs at once"):
        make_llm(max_num_seqs=2).engine.add_request([1, 2, 3], SamplingParams(n=3))
