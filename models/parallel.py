"""Tensor parallelism, Megatron's split: each of N ranks holds 1/N of every layer and the ranks add up their parts.

- Attention: rank r holds query heads [r*H/N, (r+1)*H/N) and the KV heads they read (its KV cache holds those only),
  as rows of the fused QKV projection and columns of the output projection. With fewer KV heads than ranks (N a
  multiple of them) each KV head is replicated on the N/KV ranks whose query heads read it, as vLLM does; any other
  count that does not divide is refused.
- MLP: gate and up by rows (columns of the product), down by columns (rows of the product).
- The token embedding and the output head by rows of the vocabulary (the last rank's slice padded with zero rows).
- Norms are whole on every rank, except Cohere's per-head Q/K norms, which follow their heads.

A layer's attention and MLP outputs are partial sums: one all-reduce after each (Cohere's parallel block sums both
first: one a layer). A row-parallel projection's bias is held by rank 0 alone (zeros elsewhere), so the sum counts it
once. The embedding looks up its own rows (zeros for the others) and all-reduces; the head's logits are gathered.
The loader reads each rank's slices only (`checkpoint_slice`)."""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.config import ModelConfig
from models.quant import BLOCK, GRID

# The projections split by rows (their outputs), and by columns (their inputs), under Hugging Face's names.
_HEAD_ROWS = {"q_proj"}
_KV_HEAD_ROWS = {"k_proj", "v_proj"}
_PER_HEAD = {"q_norm": False, "k_norm": True}  # Cohere's [heads, head_dim] norms; True: of the KV heads
_INTERMEDIATE_ROWS = {"gate_proj", "up_proj"}
_COLUMNS = {"o_proj": "heads", "down_proj": "intermediate"}
_VOCAB_ROWS = {"embed_tokens", "lm_head"}


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among the ranks. The default, one rank, makes every collective a no-op."""
    rank: int = 0
    size: int = 1

    @property
    def leads(self) -> bool:
        """Rank 0 of several: it starts and drives the others."""
        return self.size > 1 and self.rank == 0

    def least(self, count: int) -> int:
        """The smallest of every rank's `count` (each rank's memory holds a different number of blocks)."""
        if self.size == 1:
            return count
        value = torch.tensor([count], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return int(value)

    def span(self, total: int) -> tuple[int, int]:
        """[start, stop) of this rank's even share of `total` (which the split was checked to divide)."""
        share = total // self.size
        return self.rank * share, (self.rank + 1) * share

    def kv_head_span(self, kv_heads: int) -> tuple[int, int]:
        """This rank's KV heads: an even share, or the one head its query heads read when replicated."""
        if kv_heads >= self.size:
            return self.span(kv_heads)
        head = self.rank * kv_heads // self.size
        return head, head + 1

    def vocab_span(self, vocab: int) -> tuple[int, int]:
        """This rank's rows of the vocabulary, ceil(vocab / N) each; past `vocab` they are padding."""
        share = -(-vocab // self.size)
        return self.rank * share, (self.rank + 1) * share

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab: int) -> torch.Tensor:
        """Each rank's logits [rows, vocab share] -> every rank's, [rows, vocab], the padding dropped."""
        if self.size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        dist.all_gather(parts, logits.contiguous())
        return torch.cat(parts, dim=-1)[:, :vocab]


def check_split(cfg: ModelConfig, size: int) -> None:
    """Refuse a model that N ranks cannot share, naming the numbers."""
    problems = []
    if cfg.num_heads % size:
        problems.append(f"{cfg.num_heads} attention heads are not divisible by {size}")
    kv = cfg.num_kv_heads
    if (kv >= size and kv % size) or (kv < size and size % kv):
        problems.append(f"{kv} KV heads are neither divisible by {size} nor a divisor of it (fewer KV heads than "
                        f"ranks are replicated when the ranks divide evenly among them)")
    if cfg.intermediate_size % size:
        problems.append(f"the MLP's {cfg.intermediate_size} intermediate features are not divisible by {size}")
    if problems:
        raise ValueError(f"--tensor-parallel-size {size} cannot split this model: " + "; ".join(problems))


def local_heads(cfg: ModelConfig, tp: TensorParallel) -> tuple[int, int]:
    """Query heads and KV heads on this rank."""
    first, stop = tp.kv_head_span(cfg.num_kv_heads)
    return cfg.num_heads // tp.size, stop - first


def checkpoint_slice(name: str, cfg: ModelConfig, tp: TensorParallel) -> tuple[int, int, int] | str | None:
    """How this rank takes the checkpoint tensor `name`: (dim, start, stop) of its slice, "rank 0" for a
    row-parallel projection's bias (rank 0's whole, zeros elsewhere), "drop" for a block grid that the slice cuts
    through, or None for the whole tensor."""
    if tp.size == 1:
        return None
    module_path, _, attr = name.rpartition(".")
    part = module_path.rpartition(".")[2]
    hd = cfg.head_dim
    if part in _HEAD_ROWS:
        start, stop = tp.span(cfg.num_heads)
        return 0, start * hd, stop * hd
    if part in _KV_HEAD_ROWS:
        start, stop = tp.kv_head_span(cfg.num_kv_heads)
        return 0, start * hd, stop * hd
    if part in _PER_HEAD:
        return (0, *(tp.kv_head_span(cfg.num_kv_heads) if _PER_HEAD[part] else tp.span(cfg.num_heads)))
    if part in _INTERMEDIATE_ROWS:
        return (0, *tp.span(cfg.intermediate_size))
    if part in _COLUMNS:
        if attr not in ("weight", GRID):
            return "rank 0"
        total = cfg.num_heads * hd if _COLUMNS[part] == "heads" else cfg.intermediate_size
        start, stop = tp.span(total)
        if attr == "weight":
            return 1, start, stop
        # A quantized weight's block grid (models/quant.py): whole blocks of inputs, or none when a share is no whole
        # number of blocks (that projection then runs in float)
        return (1, start // BLOCK, stop // BLOCK) if start % BLOCK == stop % BLOCK == 0 else "drop"
    if part in _VOCAB_ROWS:
        return (0, *tp.vocab_span(cfg.vocab_size))
    return None


def take_slice(tensor: torch.Tensor, how, rank: int) -> torch.Tensor:
    """Apply `checkpoint_slice`'s answer to a whole tensor; rows past its end (vocabulary padding) are zeros."""
    if how is None:
        return tensor
    if how == "rank 0":
        return tensor if rank == 0 else torch.zeros_like(tensor)
    dim, start, stop = how
    part = tensor.narrow(dim, start, max(0, min(stop, tensor.shape[dim]) - start))
    if part.shape[dim] == stop - start:
        return part
    padding = list(part.shape)
    padding[dim] = stop - start - part.shape[dim]
    return torch.cat([part, part.new_zeros(padding)], dim=dim)
