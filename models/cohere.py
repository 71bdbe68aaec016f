"""Cohere Command-R and Command-R+ (`CohereForCausalLM`), as transformers defines it: one LayerNorm
feeding attention and MLP in parallel, rotary on interleaved pairs, optional per-head Q/K norms, and
scaled logits from the tied embedding."""
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import AttentionMetadata, KVCache
from models.causal_lm import CausalLM
from models.config import ModelConfig
from models.layers import GatedMLP, apply_rotary
from models.llama import FUSED, GGUF_LAYER, LlamaAttention, gguf_name_to_hf
from models.parallel import TensorParallel, local_heads
from models.weights import load_weights


class LayerNorm(nn.Module):
    """Mean-subtracted LayerNorm without bias over the last dimension, computed in float32; `shape`
    may be (heads, head_dim) for a separate weight per head."""

    def __init__(self, shape: int | tuple[int, ...], eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x.float(), x.shape[-1:], eps=self.eps)
        return (self.weight.float() * normed).to(x.dtype)


class CohereAttention(LlamaAttention):
    """Llama's projections, plus optional per-head Q/K norms applied before the rotation."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__(cfg, tp)
        heads, kv_heads = local_heads(cfg, tp)
        self.q_norm = LayerNorm((heads, cfg.head_dim), cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = LayerNorm((kv_heads, cfg.head_dim), cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, rotation: torch.Tensor, cache: KVCache, meta: AttentionMetadata):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        heads, kv_heads, head_dim = self.attn.num_heads, self.attn.num_kv_heads, self.attn.head_dim
        q, k = q.view(-1, heads, head_dim), k.view(-1, kv_heads, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, rotation), apply_rotary(k, rotation)
        return self.o_proj(self.attn(q, k, v.view(-1, kv_heads, head_dim), cache, meta))


class CohereDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = CohereAttention(cfg, tp)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size // tp.size, cfg.mlp_bias)

    def forward(self, x, rotation, cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        normed = self.input_layernorm(x)
        return x + self.tp.all_reduce(self.self_attn(normed, rotation, cache, meta) + self.mlp(normed))  # one sum


class CohereForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = TensorParallel()):
        super().__init__(cfg, CohereDecoderLayer, LayerNorm(cfg.hidden_size, cfg.norm_eps), tp=tp)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights(self, weights, FUSED, rotary_heads={})  # checkpoints already rotate interleaved pairs

    @staticmethod
    def gguf_name(name: str) -> str:
        """llama.cpp's `command-r` names."""
        return gguf_name_to_hf(name, {**GGUF_LAYER, "attn_q_norm": "self_attn.q_norm",
                                      "attn_k_norm": "self_attn.k_norm"})[0]

    @classmethod
    def gguf_to_hf(cls, name: str, tensor: torch.Tensor, cfg: ModelConfig) -> tuple[str, torch.Tensor]:
        """Its rows are already in the interleaved order Cohere uses."""
        return cls.gguf_name(name), tensor
