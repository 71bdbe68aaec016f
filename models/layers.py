"""Building blocks shared by the architectures."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.kernel = None  # (x, weight, eps) -> normed x, set at load (the native CPU kernel), or F.rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear whose product may run in a native kernel (set at load with the weight repacked for it)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__(in_features, out_features, bias=bias)
        self.kernel = None  # (x, packed weight, bias, out_features) -> x · weightᵀ + bias, or F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.bias, self.out_features)
        return F.linear(x, self.weight, self.bias)


class FusedLinear(Linear):
    """Several projections of the same input in one matmul; checkpoints load them shard by shard."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(shard_sizes), bias)
        self.shard_sizes = shard_sizes

    def load_shard(self, index: int, name: str, tensor: torch.Tensor) -> None:
        start = sum(self.shard_sizes[:index])
        getattr(self, name).data[start:start + self.shard_sizes[index]].copy_(tensor)


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool):
        super().__init__()
        self.gate_up_proj = FusedLinear(hidden, [intermediate, intermediate], bias)
        self.down_proj = Linear(intermediate, hidden, bias)
        self.act_kernel = None  # gate_up -> silu(gate) * up, set at load (the native CPU kernel), or the steps below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.act_kernel is not None:
            return self.down_proj(self.act_kernel(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))  # in place: no new [tokens, intermediate]


def _inv_freq(head_dim: int, theta: float | torch.Tensor) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / theta ** exponents


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1: divide low frequencies by `factor`, keep high ones, blend the band between."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, applied to (even, odd) pairs of each head as complex numbers.

    Llama checkpoints rotate the two halves of a head instead; their Q and K rows are regrouped into
    pairs at load (see `regroup_rotary`), which leaves q·k unchanged and makes rotation one complex
    multiply. Dynamic NTK scaling follows transformers: the base grows with the length of the sequence
    a token belongs to at the step it is computed, so it needs each token's sequence length.
    """

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling, max_position: int):
        super().__init__()
        self.head_dim, self.theta, self.scaling, self.max_position = head_dim, theta, scaling, max_position
        inv_freq = _inv_freq(head_dim, theta)
        if scaling.kind == "linear":
            inv_freq = inv_freq / scaling.factor
        elif scaling.kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        self.inv_freq = inv_freq  # a plain tensor, not a buffer, so that models can be built on "meta"

    def divide_frequencies(self, factors: torch.Tensor) -> None:
        """Per-frequency divisors, as llama.cpp stores Llama 3.1's scaling (`rope_freqs`) instead of metadata."""
        if factors.shape != self.inv_freq.shape or self.scaling.kind != "default":
            raise ValueError(f"{len(factors)} rotary frequency factors for {len(self.inv_freq)} frequencies "
                             f"already scaled by {self.scaling.kind!r}")
        self.inv_freq = self.inv_freq / factors.float().cpu()

    @property
    def needs_seq_lens(self) -> bool:
        return self.scaling.kind == "dynamic"

    def _dynamic_inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:
        dim, factor = self.head_dim, self.scaling.factor
        seq_lens = seq_lens.cpu().clamp(min=self.max_position).float()
        base = self.theta * ((factor * seq_lens / self.max_position) - (factor - 1)) ** (dim / (dim - 2))
        return _inv_freq(dim, base[:, None])

    def forward(self, positions: torch.Tensor, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        """e^(i·position·freq) for each token, `[tokens, 1, head_dim / 2]` complex, once for all layers."""
        inv_freq = self._dynamic_inv_freq(seq_lens) if self.needs_seq_lens else self.inv_freq[None, :]
        freqs = positions[:, None].float() * inv_freq.to(positions.device)
        return torch.polar(torch.ones_like(freqs), freqs)[:, None, :]


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of `x` [tokens, heads, head_dim] by the complex `rotation`."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


def regroup_rotary(w: torch.Tensor, heads: int, to_pairs: bool) -> torch.Tensor:
    """Reorder the rows of a Q or K projection between the two rotary layouts: each head's halves
    (Hugging Face's Llama) or its interleaved pairs (llama.cpp's GGUF, and this code)."""
    groups = (2, -1) if to_pairs else (-1, 2)
    return w.reshape(heads, *groups, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
