"""One normalized model configuration, built from a Hugging Face config.json or GGUF metadata."""
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling as transformers names it; `kind` is default, linear, dynamic or llama3."""
    kind: str = "default"
    factor: float = 1.0
    original_max_position: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-6  # of the RMSNorms (Llama) or LayerNorms (Cohere)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False  # the output head is the token embedding
    embedding_norm: bool = False  # a LayerNorm (eps 1e-5, with bias) right after the token embedding
    attention_bias: bool = False
    mlp_bias: bool = False
    logit_scale: float = 1.0  # multiplies the logits (Cohere)
    qk_norm: bool = False  # a LayerNorm over each head of Q and K (Command-R+)
    dtype: torch.dtype = torch.float32  # the checkpoint's own dtype


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _rope_scaling(params: dict[str, Any] | None, max_position: int) -> RopeScaling:
    if not params:
        return RopeScaling()
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "dynamic", "llama3"):
        raise ValueError(f"unsupported rope scaling type {kind!r}")
    return RopeScaling(
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        original_max_position=int(params.get("original_max_position_embeddings", max_position)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
    )


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Read a Hugging Face config.json (rope in `rope_scaling`/`rope_theta` or in v5's `rope_parameters`)."""
    heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    max_pos = cfg.get("max_position_embeddings", 2048)
    open_llama, cohere = cfg.get("model_type") == "open-llama", cfg.get("model_type") == "cohere"
    return ModelConfig(
        architecture=(cfg.get("architectures") or ["LlamaForCausalLM"])[0],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        max_position_embeddings=max_pos,
        norm_eps=cfg.get("layer_norm_eps" if cohere else "rms_norm_eps", 1e-5 if cohere else 1e-6),
        rope_theta=float(theta),
        rope_scaling=_rope_scaling(rope, max_pos),
        # Open-Llama names its tied head and its embedding LayerNorm differently.
        tie_word_embeddings=cfg.get("shared_input_output_embedding" if open_llama else "tie_word_embeddings", cohere),
        embedding_norm=open_llama and cfg.get("use_stable_embedding", False),
        attention_bias=cfg.get("attention_bias", False),
        mlp_bias=cfg.get("mlp_bias", False),
        logit_scale=cfg.get("logit_scale", 1.0),
        qk_norm=cfg.get("use_qk_norm", False),
        dtype=DTYPES.get(cfg.get("torch_dtype") or cfg.get("dtype") or "float32", torch.float32),
    )


_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "command-r": "CohereForCausalLM"}


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], dtype: torch.dtype) -> ModelConfig:
    """Read GGUF metadata (`<arch>.` keys); a missing `output.weight` means tied embeddings."""
    arch = meta["general.architecture"]
    if arch not in _GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}")
    key = lambda name, default=None: meta.get(f"{arch}.{name}", default)  # noqa: E731
    heads = key("attention.head_count")
    hidden = key("embedding_length")
    max_pos = key("context_length", 2048)
    scaling = None
    if key("rope.scaling.type") not in (None, "none"):
        scaling = {"type": key("rope.scaling.type"), "factor": key("rope.scaling.factor", 1.0),
                   "original_max_position_embeddings": key("rope.scaling.original_context_length", max_pos)}
    return ModelConfig(
        architecture=_GGUF_ARCHITECTURES[arch],
        vocab_size=key("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_layers=key("block_count"),
        num_heads=heads,
        num_kv_heads=key("attention.head_count_kv", heads),
        head_dim=key("attention.key_length") or hidden // heads,
        max_position_embeddings=max_pos,
        norm_eps=key("attention.layer_norm_rms_epsilon") or key("attention.layer_norm_epsilon", 1e-5),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(scaling, max_pos),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        logit_scale=key("logit_scale", 1.0),
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        dtype=dtype,
    )
