"""Llama (LLaMA, Llama-2/3, SmolLM2 and other Llama-family checkpoints), as transformers defines it,
and Open-Llama, which is Llama with an optional LayerNorm after the token embedding."""
import re
from collections.abc import Iterable

import torch
from torch import nn

from models.attention import AttentionMetadata, KVCache, PagedAttention
from models.causal_lm import CausalLM
from models.config import ModelConfig
from models.layers import FusedLinear, GatedMLP, Linear, RMSNorm, apply_rotary, regroup_rotary
from models.parallel import TensorParallel, local_heads
from models.weights import load_weights

# Checkpoint projections that live inside one fused matrix here: name -> (fused name, shard index).
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

# llama.cpp's Llama 3.1 rotary scaling, a tensor of per-frequency divisors (no Hugging Face name of its own).
FREQUENCY_FACTORS = "rotary.frequency_factors"
_GGUF_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}


class LlamaAttention(nn.Module):
    """This rank's heads (all of them on one rank): its output is a partial sum over the ranks."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        heads, kv_heads = local_heads(cfg, tp)
        self.q_size, self.kv_size = heads * cfg.head_dim, kv_heads * cfg.head_dim
        self.qkv_proj = FusedLinear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, cfg.attention_bias)
        self.attn = PagedAttention(heads, kv_heads, cfg.head_dim)

    def forward(self, x, rotation: torch.Tensor, cache: KVCache, meta: AttentionMetadata):
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        heads, kv_heads, head_dim = self.attn.num_heads, self.attn.num_kv_heads, self.attn.head_dim
        q, k = apply_rotary(qk.view(-1, heads + kv_heads, head_dim), rotation).split([heads, kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v.view(-1, kv_heads, head_dim), cache, meta))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size // tp.size, cfg.mlp_bias)
        # (x, rotation, cache, meta) -> this layer's output, in one call: set at load (the native CPU kernel), or None
        # for the steps below. It runs every step, prompt chunks included: a token then always takes the same path,
        # and its output does not depend on the batch.
        self.decode_kernel = None

    def forward(self, x, rotation, cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        if self.decode_kernel is not None:
            return self.decode_kernel(x, rotation, cache, meta)
        x = x + self.tp.all_reduce(self.self_attn(self.input_layernorm(x), rotation, cache, meta))
        return x + self.tp.all_reduce(self.mlp(self.post_attention_layernorm(x)))


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = TensorParallel()):
        embed_norm = nn.LayerNorm(cfg.hidden_size, eps=1e-5) if cfg.embedding_norm else None
        super().__init__(cfg, LlamaDecoderLayer, RMSNorm(cfg.hidden_size, cfg.norm_eps), embed_norm, tp)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Whole checkpoint tensors, or this rank's slices of them (`models.parallel.checkpoint_slice`)."""
        heads, kv_heads = local_heads(self.config, self.tp)
        load_weights(self, self._take_frequency_factors(weights), FUSED, {"q_proj": heads, "k_proj": kv_heads})

    def _take_frequency_factors(self, weights: Iterable[tuple[str, torch.Tensor]]):
        for name, tensor in weights:
            if name == FREQUENCY_FACTORS:
                self.rotary.divide_frequencies(tensor)
            else:
                yield name, tensor

    @staticmethod
    def gguf_name(name: str) -> str:
        return FREQUENCY_FACTORS if name == "rope_freqs.weight" else gguf_name_to_hf(name, GGUF_LAYER)[0]

    @staticmethod
    def gguf_to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> tuple[str, torch.Tensor]:
        """Rename a GGUF tensor and undo llama.cpp's rotary row order of the Q and K projections (whole heads: `cfg`
        counts those the tensor holds), so that both checkpoint formats reach `load_weights` as transformers holds
        them."""
        if name == "rope_freqs.weight":
            return FREQUENCY_FACTORS, tensor
        hf_name, part = gguf_name_to_hf(name, GGUF_LAYER)
        heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}.get(part)
        return hf_name, tensor if heads is None else regroup_rotary(tensor, heads, to_pairs=False)


def gguf_name_to_hf(name: str, layer_names: dict[str, str]) -> tuple[str, str | None]:
    """The Hugging Face name of a GGUF tensor, and the GGUF name of its part within a layer (None outside)."""
    base, _, attr = name.rpartition(".")
    if base in _GGUF_GLOBAL:
        return f"{_GGUF_GLOBAL[base]}.{attr}", None
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match is None or match[2] not in layer_names:
        raise ValueError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{match[1]}.{layer_names[match[2]]}.{attr}", match[2]
