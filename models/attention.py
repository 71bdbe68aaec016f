"""Paged attention: new K/V go into a block pool, queries attend over the blocks of their sequence.

This pure-PyTorch implementation runs on every device and is what the tests exercise. A faster
backend (a flash-attention kernel on CUDA) can replace `PagedAttention.forward` behind the same
metadata.
"""
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

# One layer's cache: (key blocks, value blocks), each [num_blocks, block_size, kv_heads, head_dim].
KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass
class AttentionMetadata:
    """Where a flat batch of tokens sits in the cache. Sequences with several new tokens come first."""
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens in the cache per sequence once this step's tokens are written
    num_prefills: int  # the first sequences, which have more than one new token
    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] block ids of each sequence, padded with 0
    decode_context_lens: torch.Tensor  # [num_seqs - num_prefills] context_lens of the one-token sequences

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.query_lens[:self.num_prefills])

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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]. Returns [tokens, heads * head_dim]."""
        k_cache, v_cache = cache
        k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        start = 0
        for i in range(meta.num_prefills):
            end = start + meta.query_lens[i]
            out[start:end] = self._prefill(q[start:end], k[start:end], v[start:end], cache,
                                           meta.block_tables[i], meta.context_lens[i])
            start = end
        if start < q.shape[0]:
            out[start:] = self._decode(q[start:], cache, meta.block_tables[meta.num_prefills:],
                                       meta.decode_context_lens)
        return out.flatten(1)

    def _prefill(self, q, k, v, cache: KVCache, block_table, context_len: int) -> torch.Tensor:
        """One sequence's new tokens attend causally to themselves and to what the cache held before."""
        query_len = q.shape[0]
        mask, causal = None, True
        if context_len > query_len:  # earlier tokens are in the cache already: read them all from there
            k, v = (_gather(c, block_table[None], context_len)[0] for c in cache)
            offsets = torch.arange(context_len, device=q.device)
            mask = offsets[None, :] <= offsets[context_len - query_len:, None]
            causal = False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True)
        return out.transpose(0, 1)

    def _decode(self, q, cache: KVCache, block_tables, context_lens) -> torch.Tensor:
        """One new token per sequence, batched; the query heads sharing a KV head attend together."""
        batch, max_len = q.shape[0], int(context_lens.max())
        k, v = (_gather(c, block_tables, max_len).transpose(1, 2) for c in cache)  # [B, kv_heads, S, D]
        group = self.num_heads // self.num_kv_heads
        q = q.view(batch, self.num_kv_heads, group, self.head_dim)
        valid = torch.arange(max_len, device=q.device)[None, :] < context_lens[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=self.scale)
        return out.reshape(batch, self.num_heads, self.head_dim)


def _gather(blocks: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of each sequence: [seqs, length, kv_heads, head_dim]."""
    num_blocks = -(-length // blocks.shape[1])
    return blocks[block_tables[:, :num_blocks]].flatten(1, 2)[:, :length]
