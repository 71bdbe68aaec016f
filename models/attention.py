"""Paged attention: new K/V go into a block pool, queries attend over the blocks of their sequence.

The pure-PyTorch implementation runs on every device. A kernel that reads the blocks in place may replace it
(`decode_kernel`, set at load: the native CPU kernel of `models/native.py`, which computes every token, a prompt's
too, as a query over its own sequence's blocks, so that its result does not depend on the batch); a flash-attention
kernel on CUDA can come in the same way, behind the same metadata.
"""
import itertools
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

# One layer's cache: keys and values, [2, num_blocks, block_size, kv_heads, head_dim].
KVCache = torch.Tensor


@dataclass
class AttentionMetadata:
    """Where a flat batch of tokens sits in the cache. Sequences with several new tokens come first. The kernels read
    the tensors alone (a CUDA graph records them as fixed buffers); the lists serve the PyTorch path."""
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens in the cache per sequence once this step's tokens are written
    num_prefills: int  # the first sequences, which have more than one new token
    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] block ids of each sequence, padded with 0
    decode_context_lens: torch.Tensor  # [num_seqs - num_prefills] context_lens of the one-token sequences
    # [num_seqs + 1]: where each sequence's new tokens begin in the flat batch, then where the last one ends
    query_starts: torch.Tensor | None = None
    context_lens_tensor: torch.Tensor | None = None  # [num_seqs]: context_lens as a tensor

    def __post_init__(self):
        device = self.slot_mapping.device
        if self.query_starts is None:
            self.query_starts = torch.tensor([0, *itertools.accumulate(self.query_lens)], device=device)
        if self.context_lens_tensor is None:
            self.context_lens_tensor = torch.tensor(self.context_lens, device=device)

    @cached_property
    def decode_mask(self) -> torch.Tensor:
        """[num_decodes, 1, 1, longest context]: which cached positions each one-token sequence sees."""
        lens = self.decode_context_lens
        return (torch.arange(int(lens.max()), device=lens.device)[None, :] < lens[:, None])[:, None, None, :]

    @cached_property
    def seq_len_per_token(self) -> torch.Tensor:
        """The length of the sequence each token belongs to (dynamic rotary scaling needs it)."""
        lens = torch.tensor(self.context_lens)
        return lens.repeat_interleave(torch.tensor(self.query_lens)).to(self.slot_mapping.device)


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        # (q, cache, block_tables, context_lens, scale, query_starts) -> out for every token, or the PyTorch path
        self.decode_kernel = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]. Returns [tokens, heads * head_dim]."""
        slots = cache.view(2, -1, self.num_kv_heads, self.head_dim)
        slots[0].index_copy_(0, meta.slot_mapping, k.to(cache.dtype))  # the cache may be narrower (bfloat16)
        slots[1].index_copy_(0, meta.slot_mapping, v.to(cache.dtype))
        if self.decode_kernel is not None:  # every token a query over its own sequence's blocks: batch-invariant
            return self.decode_kernel(q, cache, meta.block_tables, meta.context_lens_tensor, self.scale,
                                      meta.query_starts).flatten(1)
        parts, start = [], 0
        for i in range(meta.num_prefills):
            end = start + meta.query_lens[i]
            parts.append(self._prefill(q[start:end], k[start:end], v[start:end], cache,
                                       meta.block_tables[i], meta.context_lens[i]))
            start = end
        if start < q.shape[0]:
            parts.append(self._decode(q[start:], cache, meta.block_tables[meta.num_prefills:], meta.decode_mask))
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).flatten(1)

    def _prefill(self, q, k, v, cache: KVCache, block_table, context_len: int) -> torch.Tensor:
        """One sequence's new tokens attend causally to themselves and to what the cache held before."""
        query_len = q.shape[0]
        mask, causal = None, True
        if context_len > query_len:  # earlier tokens are in the cache already: read them all from there
            k, v = _gather(cache, block_table[None], context_len)[:, 0].to(q.dtype)
            offsets = torch.arange(context_len, device=q.device)
            mask = offsets[None, :] <= offsets[context_len - query_len:, None]
            causal = False
        # [1, heads, tokens, head_dim]: PyTorch's fused CPU kernel takes only 4-d inputs (3-d ones run the slow
        # math path).
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                             enable_gqa=True)
        return out[0].transpose(0, 1)

    def _decode(self, q, cache: KVCache, block_tables, mask) -> torch.Tensor:
        """One new token per sequence, batched; the query heads sharing a KV head attend together."""
        batch = q.shape[0]
        k, v = _gather(cache, block_tables, mask.shape[-1]).to(q.dtype).transpose(2, 3)  # each [B, kv_heads, S, D]
        q = q.reshape(batch, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return out.reshape(batch, self.num_heads, self.head_dim)


def _gather(cache: KVCache, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """Keys and values of the first `length` cached tokens of each sequence, in one copy:
    [2, seqs, length, kv_heads, head_dim]. Whole blocks are rows of a 2-d view picked with index_select,
    which copies at memory speed (indexing the 5-d cache directly was 2.5x slower on the CPU)."""
    total_blocks, block_size = cache.shape[1], cache.shape[2]
    ids = block_tables[:, :-(-length // block_size)]
    rows = torch.cat([ids.flatten(), ids.flatten() + total_blocks])  # K blocks, then V blocks
    picked = cache.view(2 * total_blocks, -1).index_select(0, rows)
    return picked.view(2, *ids.shape, *cache.shape[2:]).flatten(2, 3)[:, :, :length]
