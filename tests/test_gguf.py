"""GGUF loading of every supported tensor type, against transformers' own GGUF loading of the same file."""
import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM as HFLlama

from models.loader import load_model
from tests.helpers import SingleSequence

CFG = dict(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
           tie_word_embeddings=False)
HF_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
# K-quant blocks: (bytes per 256 values, byte offsets of their float16 scales). gguf cannot quantize
# to these, so their blocks are random bytes with sane scales, which both loaders must read alike.
K_BLOCKS = {Q.Q4_K: (144, (0, 2)), Q.Q6_K: (210, (208,))}


def _gguf_name(name: str) -> str:
    module, attr = name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, index, rest = module.split(".", 3)
        return f"blk.{index}.{HF_TO_GGUF[rest]}.{attr}"
    return f"{HF_TO_GGUF[module]}.{attr}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary row order for Q and K: each head's two halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_k_blocks(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    block_bytes, scale_offsets = K_BLOCKS[qtype]
    blocks = rng.integers(0, 256, (rows, cols // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        blocks[:, :, offset:offset + 2] = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def write_gguf(hf, path, qtype: Q, arch: str = "llama", extra: dict[str, np.ndarray] | None = None) -> None:
    """As llama.cpp's converter writes it: for `llama` the Q/K rows in its rotary order; `extra` tensors as given."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(CFG["max_position_embeddings"])
    writer.add_embedding_length(CFG["hidden_size"])
    writer.add_block_count(CFG["num_hidden_layers"])
    writer.add_feed_forward_length(CFG["intermediate_size"])
    writer.add_head_count(CFG["num_attention_heads"])
    writer.add_head_count_kv(CFG["num_key_value_heads"])
    writer.add_rope_freq_base(CFG["rope_theta"])
    writer.add_vocab_size(CFG["vocab_size"])
    if arch == "llama":
        writer.add_layer_norm_rms_eps(CFG["rms_norm_eps"])
    else:
        writer.add_layer_norm_eps(hf.config.layer_norm_eps)
        writer.add_logit_scale(hf.config.logit_scale)
    rng = np.random.default_rng(0)
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and hf.config.tie_word_embeddings:
            continue  # a tied head is not written
        array = tensor.numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            array = _permute(array, CFG["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"])
        if array.ndim == 1 or "norm" in name or qtype == Q.F32:
            writer.add_tensor(_gguf_name(name), array.astype(np.float32))
        elif qtype in K_BLOCKS:
            writer.add_tensor(_gguf_name(name), _random_k_blocks(*array.shape, qtype, rng), raw_dtype=qtype)
        else:
            writer.add_tensor(_gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return HFLlama(LlamaConfig(**CFG, initializer_range=0.05)).eval()


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K],
                         ids=lambda q: q.name)
def test_logits_match_transformers_gguf_loading(hf_model, tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf(hf_model, path, qtype)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ours = load_model(path, torch.float32, torch.device("cpu"), quantization="none")
    ids = list(range(3, 40))
    got = SingleSequence(ours, len(ids)).feed(ids)
    with torch.inference_mode():
        expected = theirs(torch.tensor([ids])).logits[0]
        if qtype == Q.F32:  # also the original weights: the rotary rows were put back in their order
            torch.testing.assert_close(got, hf_model(torch.tensor([ids])).logits[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_command_r_gguf_matches_transformers(tmp_path):
    """Cohere as llama.cpp's `command-r` architecture: tied head, per-head Q/K norms, logit scale. transformers
    cannot load this architecture from GGUF, so the oracle is its model on the same (float32) weights."""
    from transformers import CohereConfig, CohereForCausalLM
    torch.manual_seed(0)
    keep = {k: CFG[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "max_position_embeddings")}
    hf = CohereForCausalLM(CohereConfig(**keep, use_qk_norm=True, logit_scale=0.5, rope_theta=10000.0,
                                        initializer_range=0.05)).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
    path = tmp_path / "tiny-command-r.gguf"
    write_gguf(hf, path, Q.F32, arch="command-r")
    ours = load_model(path, torch.float32, torch.device("cpu"), quantization="none")
    assert ours.config.qk_norm and ours.config.logit_scale == 0.5 and ours.config.tie_word_embeddings
    ids = list(range(3, 40))
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(SingleSequence(ours, len(ids)).feed(ids), expected, atol=1e-4, rtol=0)


def _llama_cpp_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp's converter writes for Llama 3.1's scaling: a divisor per frequency."""
    old, low, high, factor = (rope[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                                  "high_freq_factor", "factor"))
    factors = []
    for freq in 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_rope_scaling_from_the_rope_freqs_tensor(tmp_path):
    """Llama 3.1 and 3.2 GGUF files carry their rotary scaling as `rope_freqs`, not as metadata. transformers'
    GGUF loading ignores that tensor, so the oracle is its model with the same scaling on the same weights."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
            "original_max_position_embeddings": 64, "rope_theta": CFG["rope_theta"]}  # all three bands in use
    torch.manual_seed(0)
    hf = HFLlama(LlamaConfig(**{k: v for k, v in CFG.items() if k != "rope_theta"}, rope_parameters=rope,
                             initializer_range=0.05)).eval()
    path = tmp_path / "tiny-llama3.gguf"
    factors = _llama_cpp_rope_factors(rope, CFG["hidden_size"] // CFG["num_attention_heads"])
    assert {1.0, 8.0} < set(factors.tolist())
    write_gguf(hf, path, Q.F32, extra={"rope_freqs.weight": factors})
    ids = list(range(3, 40))
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0]
    ours = load_model(path, torch.float32, torch.device("cpu"), quantization="none")
    torch.testing.assert_close(SingleSequence(ours, len(ids)).feed(ids), expected, atol=1e-4, rtol=0)
