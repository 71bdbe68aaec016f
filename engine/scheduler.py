"""Continuous batching: which requests run this step, and with how many new tokens.

Every running request gets the tokens it needs to catch up with its sequence (one decode token, or
a whole prompt after admission or preemption) within a token budget and a sequence limit. Waiting
requests are admitted in arrival order while blocks last. When blocks run out, the newest running
request is preempted: its blocks are freed and it is recomputed from scratch later.
"""
import time
from collections import deque
from dataclasses import dataclass

from engine.kv_cache import BlockPool
from engine.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int


@dataclass
class ScheduledBatch:
    """Sequences to run this step, those with several new tokens first, and how many tokens each."""
    seqs: list[Sequence]
    num_new_tokens: list[int]

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool):
        self.config, self.pool = config, pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        # The new running list is built aside and swapped in at the end: metrics read it from another
        # thread and must never see a transient empty batch.
        candidates, running = list(self.running), []
        preempted = False
        while candidates:
            seq = candidates.pop(0)
            new_tokens = seq.num_tokens - seq.num_computed_tokens
            while not self._reserve(seq, new_tokens):
                preempted = True
                if not candidates:
                    self._preempt(seq)
                    break
                self._preempt(candidates.pop())
            else:
                running.append(seq)
                scheduled.append((seq, new_tokens))
                budget -= new_tokens
        while self.waiting and not preempted and len(running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            new_tokens = seq.num_tokens - seq.num_computed_tokens
            if new_tokens > budget or not self._reserve(seq, new_tokens):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.first_scheduled_time = seq.first_scheduled_time or time.time()
            running.append(seq)
            scheduled.append((seq, new_tokens))
            budget -= new_tokens
        self.running = running
        scheduled.sort(key=lambda item: item[1] == 1)  # prefills first, as attention expects
        return ScheduledBatch([s for s, _ in scheduled], [n for _, n in scheduled])

    def _reserve(self, seq: Sequence, new_tokens: int) -> bool:
        needed = -(-(seq.num_computed_tokens + new_tokens) // self.config.block_size) - len(seq.block_table)
        if needed > self.pool.num_free:
            return False
        seq.block_table += self.pool.allocate(max(needed, 0))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.pool.free(seq.block_table)
        seq.block_table = []

    def finish(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED
