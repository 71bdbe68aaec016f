"""Continuous batching: which requests run this step, and with how many new tokens.

Each step spends a token budget. Running requests that decode get their one token first, so that streams keep
their pace; then prompts are computed, a chunk at a time when the budget left is smaller than the prompt (chunked
prefill). Waiting requests are admitted in arrival order while seats, budget and blocks last; a prompt's leading
blocks found in the prefix cache are not computed again. When blocks run out, a running request is preempted (one
computing its prompt before one decoding, the newest first): its blocks go back to the pool, cached ones stay
cached, and it is recomputed later, from whatever of it is still cached.
"""
import time
from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache import BlockPool, block_hashes
from engine.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True


@dataclass
class ScheduledBatch:
    """Sequences to run this step, those with several new tokens first, and how many tokens each; and the KV blocks
    to copy (source, destination) before the step writes any."""
    seqs: list[Sequence]
    num_new_tokens: list[int]
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool):
        self.config, self.pool = config, pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache, as vLLM counts them
        self.prefix_cache_hits = 0  # and those found
        self._block_copies: list[tuple[int, int]] = []  # for the next step to make, before it writes

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        self._budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        # The new running list is built aside and swapped in at the end: metrics read it from another
        # thread and must never see a transient empty batch.
        candidates = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)  # decodes first
        running, preempted = [], False
        while candidates:
            seq = candidates.pop(0)
            new_tokens = self._chunk(seq)
            while new_tokens and not self._reserve(seq, new_tokens):
                preempted = True
                if not candidates:
                    self._preempt(seq)
                    break
                self._preempt(candidates.pop())
            else:
                running.append(seq)  # with no budget left it holds its blocks and waits for the next step
                if new_tokens:
                    scheduled.append((seq, new_tokens))
                    self._budget -= new_tokens
        seats = self.config.max_num_seqs - sum(1 + len(s.forks) for s in running)  # choices yet to fork included
        while self.waiting and not preempted and self._budget and 1 + len(self.waiting[0].forks) <= seats:
            seq = self.waiting[0]
            new_tokens = self._admit(seq)
            if not new_tokens:
                break
            self.waiting.popleft()
            running.append(seq)
            scheduled.append((seq, new_tokens))
            self._budget -= new_tokens
            seats -= 1 + len(seq.forks)
        self.running = running
        scheduled.sort(key=lambda item: item[1] == 1)  # prefills first, as attention expects
        copies, self._block_copies = self._block_copies, []
        return ScheduledBatch([s for s, _ in scheduled], [n for _, n in scheduled], copies)

    def _chunk(self, seq: Sequence) -> int:
        """The tokens `seq` would compute this step: all it lacks, or as many as the budget has left; without
        chunked prefill, none unless all fit."""
        lacking = seq.num_tokens - seq.num_computed_tokens
        if self.config.enable_chunked_prefill:
            return min(lacking, self._budget)
        return lacking if lacking <= self._budget else 0

    def _admit(self, seq: Sequence) -> int:
        """Take the first waiting request's cached prefix and blocks for what it computes this step: the number
        of tokens it computes, or 0 (holding nothing) when it does not fit."""
        hits = self._reuse_cached_prefix(seq)
        new_tokens = self._chunk(seq)
        if not new_tokens or not self._reserve(seq, new_tokens):
            self._release(seq)
            seq.num_computed_tokens = 0
            return 0
        self.prefix_cache_queries += seq.num_tokens if self.config.enable_prefix_caching else 0
        self.prefix_cache_hits += hits
        seq.status = Status.RUNNING
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time, seq.num_cached_tokens = time.time(), hits
        return new_tokens

    def _reuse_cached_prefix(self, seq: Sequence) -> int:
        """Start `seq` from the cached blocks of its leading full blocks; its last token is always computed (its
        logits are needed), so a fully cached prompt computes its last block again. A prompt that scores its tokens
        (prompt logprobs) needs the logits of every position: it reuses nothing. Returns the tokens reused."""
        if not self.config.enable_prefix_caching or seq.prompt_logprobs is not None:
            return 0
        size = self.config.block_size
        seq.block_hashes = block_hashes(seq.token_ids, size, seq.cache_salt, seq.block_hashes)
        seq.block_table = self.pool.cached_prefix(seq.block_hashes[:(seq.num_tokens - 1) // size])
        seq.num_computed_tokens = len(seq.block_table) * size
        return seq.num_computed_tokens

    def _reserve(self, seq: Sequence, new_tokens: int) -> bool:
        needed = -(-(seq.num_computed_tokens + new_tokens) // self.config.block_size) - len(seq.block_table)
        if needed > self.pool.num_free:
            return False
        seq.block_table += self.pool.allocate(max(needed, 0))
        return True

    def advance(self, batch: ScheduledBatch) -> list[tuple[int, Sequence]]:
        """After the model ran: count the tokens computed, cache the blocks they filled, and say who samples a
        token, as (row of the batch, sequence): those that caught up with their tokens, and the other choices of
        a prompt that was just computed, forked from its row."""
        due = []
        for row, (seq, count) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            seq.num_computed_tokens += count
            self._cache_full_blocks(seq, count)
            if seq.num_computed_tokens == seq.num_tokens:
                due += [(row, seq)] + [(row, choice) for choice in self._fork(seq)]
        return due

    def _cache_full_blocks(self, seq: Sequence, count: int) -> None:
        size = self.config.block_size
        first, full = (seq.num_computed_tokens - count) // size, seq.num_computed_tokens // size
        if self.config.enable_prefix_caching and full > first:
            seq.block_hashes = block_hashes(seq.token_ids, size, seq.cache_salt, seq.block_hashes)
            for i in range(first, full):
                self.pool.cache(seq.block_table[i], seq.block_hashes[i])

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """Start the other choices of `seq`'s prompt, which was just computed. They share its full blocks. Each gets
        a copy of the prompt's last, partial block, as its own tokens written into a shared one would overwrite its
        siblings'; with no block free for the copy, it computes that block's tokens again instead."""
        choices, seq.forks = seq.forks, []
        full, partial = divmod(seq.num_tokens, self.config.block_size)
        for choice in choices:
            choice.block_table, choice.block_hashes = seq.block_table[:full], seq.block_hashes[:full]
            self.pool.share(choice.block_table)
            choice.num_computed_tokens = full * self.config.block_size
            if partial and self.pool.num_free:
                choice.block_table += self.pool.allocate(1)
                self._block_copies.append((seq.block_table[full], choice.block_table[-1]))
                choice.num_computed_tokens = seq.num_tokens
            choice.status, choice.first_scheduled_time = Status.RUNNING, seq.first_scheduled_time
            self.running.append(choice)
        return choices

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
