"""Random workloads through a tiny random-weight Llama: prompts sharing prefixes, several choices, aborts at any
time, a cache small enough to preempt and evict, chunks of every size. After every step each block's reference
count is the number of sequences holding it, and at the end no block is held."""
import contextlib
import random
from collections import Counter

import pytest

from engine import LLM, SamplingParams
from tests.helpers import tiny_llama


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny"), context=256)


def _assert_counts_match_holders(engine) -> None:
    held = Counter(block for choices in engine.requests.values() for seq in choices for block in seq.block_table)
    pool = engine.pool
    assert [pool._ref_counts[block] for block in range(pool.num_blocks)] == [held[b] for b in range(pool.num_blocks)]
    assert pool.num_free == pool.num_blocks - len(held)


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_keep_the_block_accounting_exact(checkpoint, seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 16])
    llm = LLM(str(checkpoint), block_size=block_size, num_kv_blocks=rng.choice([96, 160]) // block_size,
              max_num_batched_tokens=rng.choice([8, 32, 256]), max_num_seqs=rng.choice([4, 16]))
    engine = llm.engine
    prefixes = [[rng.randrange(3, 32000) for _ in range(rng.randrange(0, 60))] for _ in range(3)]
    for step in range(150):
        if rng.random() < 0.3:
            prompt = rng.choice(prefixes) + [rng.randrange(3, 32000) for _ in range(rng.randrange(1, 30))]
            params = SamplingParams(n=rng.choice([1, 1, 2, 3]), temperature=rng.choice([0, 1]),
                                    max_tokens=rng.randrange(1, 40), ignore_eos=True)
            with contextlib.suppress(ValueError):  # one that can never fit the cache is refused, as it should be
                engine.add_request(prompt, params, cache_salt=rng.choice([None, "a"]))
        if engine.requests and rng.random() < 0.05:
            engine.abort(rng.choice(list(engine.requests)))
        engine.step()
        _assert_counts_match_holders(engine)
    for request_id in list(engine.requests):
        engine.abort(request_id)
    assert not engine.has_unfinished_requests() and engine.pool.usage == 0
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.prefix_cache_hits > 0  # the workload did both

