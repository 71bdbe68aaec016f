"""The pool of KV-cache blocks: ids, reference counts, and the prefix cache. The tensors live in the runner.

A full block is named by a hash of its tokens chained to the hash of the block before it (the first one to a
salt), so equal hashes mean equal prefixes. A block no request holds keeps its hash, and its K/V, until the space
is needed: free space comes first from blocks that hold nothing, then from cached ones, least recently used
first.
"""
import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence


def block_hashes(tokens: Sequence[int], block_size: int, salt: str | None, known: list[bytes]) -> list[bytes]:
    """`known` extended with the hash of every further full block of `tokens` (SHA-256: a collision would hand one
    prompt's K/V to another, so no 64-bit hash)."""
    hashes = list(known)
    previous = hashes[-1] if hashes else hashlib.sha256((salt or "").encode()).digest()
    for start in range(len(hashes) * block_size, len(tokens) - block_size + 1, block_size):
        previous = hashlib.sha256(previous + array("I", tokens[start:start + block_size]).tobytes()).digest()
        hashes.append(previous)
    return hashes


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._empty = deque(range(num_blocks))  # held by nobody, holding nothing worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # held by nobody, cached: least recent first
        self._ref_counts = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks that an allocation may take: empty ones and cached ones nobody holds."""
        return len(self._empty) + len(self._evictable)

    @property
    def usage(self) -> float:
        """The fraction of blocks held by requests (cached blocks free to evict do not count)."""
        return 1 - self.num_free / self.num_blocks

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise RuntimeError(f"asked for {count} KV blocks, {self.num_free} free")
        blocks = [self._take() for _ in range(count)]
        for block in blocks:
            self._ref_counts[block] = 1
        return blocks

    def _take(self) -> int:
        if self._empty:
            return self._empty.popleft()
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block

    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`, now held by the caller (each one more reference)."""
        blocks = []
        for block_hash in hashes:
            block = self._block_of.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        self.share(blocks)
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more holder for each block (a cache hit, or a choice forked from its prompt)."""
        for block in blocks:
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1

    def cache(self, block: int, block_hash: bytes) -> None:
        """Record that a held block is full and holds the prefix `block_hash` names. When another block holds that
        prefix already (two equal prompts computed at once), this one stays unnamed and is freed as empty."""
        if block_hash not in self._block_of and block not in self._hash_of:
            self._block_of[block_hash], self._hash_of[block] = block, block_hash

    def free(self, blocks: list[int]) -> None:
        """The one place blocks are released. A block its last holder lets go of is kept if it is cached (to be
        evicted last block first: a prompt's later blocks are worth less than its first ones), else emptied."""
        for block in reversed(blocks):
            if self._ref_counts[block] < 1:  # a second free would hand the block to two sequences
                raise RuntimeError(f"KV block {block} freed while free")
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._empty.append(block)
