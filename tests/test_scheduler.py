"""The scheduler and the block pool alone (narrow unit tests, no model): admission, preemption order, aborts."""
import pytest

from engine.kv_cache import BlockPool
from engine.params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence, Status

BLOCK = 2


def _setup(num_blocks: int, *prompt_lens: int) -> tuple[Scheduler, list[Sequence]]:
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=BLOCK),
                          BlockPool(num_blocks))
    seqs = [Sequence(str(i), None, list(range(n)), SamplingParams(), 16, None) for i, n in enumerate(prompt_lens)]
    for seq in seqs:
        scheduler.add(seq)
    return scheduler, seqs


def _run_step(scheduler: Scheduler) -> list[str]:
    """Schedule, then do what the engine does after the model ran: the tokens are computed, one more is out."""
    batch = scheduler.schedule()
    for seq, count in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += count
        seq.token_ids.append(0)
    return [seq.request_id for seq in batch.seqs]


def test_the_newest_running_request_is_preempted_first_and_waits_at_the_front():
    scheduler, (a, b, c) = _setup(4, 2, 2, 2)  # one block each for the prompts; 4 blocks in all
    assert _run_step(scheduler) == ["0", "1", "2"]
    # the third token of each needs a block more each, and one is free: a takes it, c (the newest) goes for b
    assert _run_step(scheduler) == ["0", "1"]
    assert [s.request_id for s in scheduler.running] == ["0", "1"] and list(scheduler.waiting) == [c]
    assert c.status is Status.WAITING and c.block_table == [] and c.num_computed_tokens == 0
    assert scheduler.num_preemptions == 1 and scheduler.pool.num_free == 0


def test_a_request_that_cannot_grow_preempts_itself_when_nothing_newer_runs():
    scheduler, (a, b) = _setup(3, 3, 2)  # a: 2 blocks, b: 1 block, the pool full
    _run_step(scheduler)
    assert _run_step(scheduler) == ["0"]  # b's third token needs a block; no newer request to take it from
    assert b.status is Status.WAITING and list(scheduler.waiting) == [b] and b.block_table == []
    assert scheduler.running == [a] and scheduler.pool.num_free == 1


def test_aborting_a_preempted_request_frees_nothing_twice():
    scheduler, (a, b, c) = _setup(4, 2, 2, 2)
    _run_step(scheduler)
    _run_step(scheduler)
    scheduler.finish(c)  # preempted, waiting, holding no block
    assert c.status is Status.FINISHED and not scheduler.waiting and scheduler.pool.num_free == 0
    scheduler.finish(a)
    scheduler.finish(b)
    assert not scheduler.has_unfinished() and scheduler.pool.num_free == 4


def test_a_second_free_of_a_block_is_refused():
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(RuntimeError, match="freed while free"):
        pool.free(blocks)
    assert pool.num_free == 2


def test_the_pool_takes_empty_blocks_then_cached_ones_least_recent_first_and_last_blocks_first():
    pool = BlockPool(6)
    a, b = pool.allocate(2), pool.allocate(2)
    for block, block_hash in zip(a + b, [b"a0", b"a1", b"b0", b"b1"]):
        pool.cache(block, block_hash)
    pool.free(a)
    pool.free(b)
    assert pool.num_free == 6 and pool.usage == 0
    assert set(pool.allocate(2)).isdisjoint(a + b)  # the two blocks that never held anything
    assert pool.cached_prefix([b"b0", b"b1", b"c"]) == b and pool.num_free == 2  # a hit holds b's blocks again
    assert pool.allocate(1) == [a[1]] and pool.allocate(1) == [a[0]]  # a's last block goes before its first
    assert pool.cached_prefix([b"a0"]) == []


def test_a_prefix_computed_twice_at_once_is_cached_once():
    pool = BlockPool(2)
    first, second = pool.allocate(1), pool.allocate(1)
    pool.cache(first[0], b"same")
    pool.cache(second[0], b"same")
    pool.free(first + second)
    assert pool.cached_prefix([b"same"]) == first
    assert pool.allocate(1) == second  # the copy held nothing worth keeping: taken before the cached block
