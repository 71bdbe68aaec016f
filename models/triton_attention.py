"""Paged attention in Triton, for CUDA: every query token, a prompt's too, attends over its own sequence's keys and
values, read in place from the block pool through the block table (the PyTorch path copies them out first), with the
query heads that share a KV head computed together. One kernel serves decode and prefill, chunked prefill and prefix
hits alike: the same call as the native CPU kernel's (`PagedDecodeKernel`), so it plugs in as `decode_kernel`.

A program takes a tile of up to TILE consecutive queries of one sequence and one KV head: its rows are (query, head
of the group), each with its own context length (a prompt's causal mask), and it walks the longest of them in
chunks of CHUNK tokens with an online softmax (flash attention's rescaling). The grid is (tiles, KV heads): in a
decode batch one program a sequence; with prompts, each sequence's tiles in a run of programs that a binary search
over the query starts finds (the host never reads the batch's lengths, so a CUDA graph can record the launch), with
at most one spare program a sequence, which returns at once. It runs on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1`), which is how it is tested without a GPU."""
import torch
import triton
import triton.language as tl

TILE = 16  # queries of one sequence in a program
CHUNK = 32  # context tokens a loop step reads


@triton.jit(do_not_specialize=["num_seqs", "table_width"])  # they change step by step: one compile serves all
def _paged_attention(q, keys, values, out, block_tables, query_starts, context_lens, scale, num_seqs, table_width,
                     block_size, GROUP: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     DIM: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr, CHUNK: tl.constexpr,
                     EXACT: tl.constexpr):
    program, head = tl.program_id(0), tl.program_id(1)
    seq, first_tile = program, program  # decode: a program a sequence
    if TILE > 1:  # the sequence whose tiles hold this program: the last s whose first tile is at or before it
        low, high = 0, num_seqs - 1
        while low < high:
            middle = (low + high + 1) // 2
            if (tl.load(query_starts + middle) // TILE).to(tl.int32) + middle <= program:
                low = middle
            else:
                high = middle - 1
        seq = low
        first_tile = (tl.load(query_starts + seq) // TILE).to(tl.int32) + seq
    begin, end = tl.load(query_starts + seq), tl.load(query_starts + seq + 1)
    first = begin + (program - first_tile) * TILE
    if first < end:
        context = tl.load(context_lens + seq)
        rows, dims = tl.arange(0, ROWS), tl.arange(0, DIM)
        query = first + rows // GROUP
        valid = (rows < TILE * GROUP) & (query < end)
        lengths = tl.where(valid, context - (end - 1 - query), 1)  # each row's causal context
        longest = tl.max(lengths, 0)
        heads = head * GROUP + rows % GROUP
        dim_ok = dims < HEAD_DIM
        q_rows = tl.load(q + (query[:, None] * KV_HEADS * GROUP + heads[:, None]) * HEAD_DIM + dims[None, :],
                         mask=valid[:, None] & dim_ok[None, :], other=0.0)
        top = tl.full((ROWS,), float("-inf"), tl.float32)
        total = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, DIM), tl.float32)
        for start in range(0, longest, CHUNK):
            tokens = start + tl.arange(0, CHUNK)
            present = tokens < longest
            block = tl.load(block_tables + seq * table_width + tokens // block_size, mask=present, other=0)
            at = ((block * block_size + tokens % block_size) * KV_HEADS + head) * HEAD_DIM
            where = at[:, None] + dims[None, :]
            both = present[:, None] & dim_ok[None, :]
            k = tl.load(keys + where, mask=both, other=0.0)
            v = tl.load(values + where, mask=both, other=0.0)
            if EXACT:
                scores = tl.dot(q_rows, tl.trans(k), input_precision="ieee") * scale
            else:
                scores = tl.dot(q_rows.to(k.dtype), tl.trans(k)) * scale
            scores = tl.where(tokens[None, :] < lengths[:, None], scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            weights = tl.exp(scores - new_top[:, None])
            rescale = tl.exp(top - new_top)
            total = total * rescale + tl.sum(weights, 1)
            if EXACT:
                acc = acc * rescale[:, None] + tl.dot(weights, v, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
            top = new_top
        result = acc / total[:, None]
        tl.store(out + (query[:, None] * KV_HEADS * GROUP + heads[:, None]) * HEAD_DIM + dims[None, :],
                 result.to(out.dtype.element_ty), mask=valid[:, None] & dim_ok[None, :])


class TritonPagedAttention:
    """(q [queries, heads, head_dim], cache [2, blocks, block_size, kv_heads, head_dim], block_tables [seqs, width],
    context_lens [seqs], scale, query_starts [seqs + 1]) -> [queries, heads, head_dim], as `PagedDecodeKernel`:
    sequence s's queries are q[query_starts[s]:query_starts[s + 1]], the last of which sees its first
    context_lens[s] cached tokens and each one before it one token fewer."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def __call__(self, q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float, query_starts: torch.Tensor | None = None) -> torch.Tensor:
        seqs = len(block_tables)
        if query_starts is None:
            query_starts = torch.arange(len(q) + 1, device=q.device)
        if q.shape[1:] != (self.num_heads, self.head_dim) or cache.shape[0] != 2 \
                or cache.shape[3:] != (self.num_kv_heads, self.head_dim) or not len(context_lens) == seqs \
                == len(query_starts) - 1 or len({q.device, cache.device, block_tables.device}) != 1:
            raise ValueError(f"paged attention takes q [queries, {self.num_heads}, {self.head_dim}], a cache of "
                             f"{self.num_kv_heads} KV heads of {self.head_dim} and a table, a length and a query start "
                             f"per sequence, on one device; got q {tuple(q.shape)}, cache {tuple(cache.shape)}, "
                             f"{seqs} tables, {len(context_lens)} lengths, {len(query_starts)} starts")
        q, cache, block_tables = q.contiguous(), cache.contiguous(), block_tables.contiguous()
        out = torch.empty_like(q)
        if seqs == 0:
            return out
        tile = TILE if len(q) > seqs else 1  # decode: one query a sequence, one program each
        # Sequence s's tiles are programs s + query_starts[s] // tile onwards: at most one more than its queries
        # fill, so len(q) // tile + seqs programs hold them all (a decode batch needs seqs).
        grid = (len(q) // tile + seqs if tile > 1 else seqs, self.num_kv_heads)
        _paged_attention[grid](q, cache[0], cache[1], out, block_tables, query_starts.contiguous(),
                               context_lens.contiguous(), scale, seqs, block_tables.shape[1], cache.shape[2],
                               **self.constants(tile, q.dtype == torch.float32 and cache.dtype == torch.float32))
        return out

    def constants(self, tile: int, exact: bool) -> dict:
        """The kernel's compile-time constants for tiles of `tile` queries; `exact`: float32 products (IEEE, not
        TF32), for float32 queries and cache."""
        group = self.num_heads // self.num_kv_heads
        return dict(GROUP=group, KV_HEADS=self.num_kv_heads, HEAD_DIM=self.head_dim,
                    DIM=max(16, triton.next_power_of_2(self.head_dim)),
                    ROWS=max(16, triton.next_power_of_2(tile * group)), TILE=tile, CHUNK=CHUNK, EXACT=exact)
