"""Quantized linear layers: GGUF block grids, the integer kernel on every path against a PyTorch reference, the
quality gate on the default model, and --quantization on a float checkpoint."""
import os
import platform
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as GGML
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize
from transformers import LlamaConfig, LlamaForCausalLM as HFLlama

from models import quant
from models.loader import load_model
from models.native import compile_kernels
from models.quality import TEXT, evaluate, logits
from models.tokenizer import load_tokenizer

needs_compiler = pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("gcc")), reason="no C compiler")
# (rows, outputs, inputs): one row and a few (decode), a tile and a bit, a prompt; outputs that end a panel early.
SHAPES = [(1, 16, 32), (3, 37, 96), (13, 200, 576), (70, 45, 1536)]


def _random_q4_k(rows: int, inputs: int, seed: int) -> np.ndarray:
    """Random Q4_K blocks (gguf cannot quantize to it): random scales, mins and nibbles, small fp16 d and dmin."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * inputs // 256, 144), dtype=np.uint8)
    blocks[:, :4] = rng.uniform(1e-4, 1e-2, (len(blocks), 2)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype, bits", [(GGML.Q8_0, 8), (GGML.Q4_0, 4), (GGML.Q4_1, 4), (GGML.Q4_K, 4),
                                         (GGML.Q5_0, 8), (GGML.Q5_1, 8)])
def test_a_gguf_grid_gives_back_the_files_integers(qtype, bits):
    """Packing recovers each block's integers from the dequantized values and the grid: dequantizing them again
    gives the file's values exactly, in as few bits as they need."""
    rows, inputs = 24, 512
    if qtype == GGML.Q4_K:
        raw = _random_q4_k(rows, inputs, 0)
    else:
        raw = gguf_quantize(np.random.default_rng(1).standard_normal((rows, inputs), np.float32), qtype)
    values = torch.from_numpy(gguf_dequantize(raw, qtype).reshape(rows, inputs))
    u, d, m, got_bits = quant.quantize(values, quant.gguf_grid(raw, qtype, rows, inputs), None)
    assert got_bits == bits
    assert torch.equal(quant.dequantize(u, d, m), values)


def test_types_without_a_grid_of_32_are_quantized_afresh_in_8_bits():
    rows, inputs = 4, 256
    values = torch.randn(rows, inputs)
    grid = quant.gguf_grid(np.zeros((rows, 210), np.uint8), GGML.Q6_K, rows, inputs)
    assert grid.isnan().all()
    u, d, m, bits = quant.quantize(values, grid, None)
    assert bits == 8
    step = values.abs().reshape(rows, -1, 32).amax(-1) / 127
    assert ((quant.dequantize(u, d, m) - values).abs().reshape(rows, -1, 32) <= step[..., None] / 2 + 1e-6).all()
    assert quant.gguf_grid(np.zeros((rows, inputs * 4), np.uint8), GGML.F32, rows, inputs) is None


def test_4_bits_asked_of_8_bit_blocks_requantizes_them():
    values = torch.randn(8, 64)
    u8, d8, m8, _ = quant.quantize(values, None, 8)
    u, d, m, bits = quant.quantize(quant.dequantize(u8, d8, m8), torch.stack([d8, m8], -1), 4)
    assert bits == 4 and u.max() <= 15
    low, high = values.reshape(8, 2, 32).amin(-1), values.reshape(8, 2, 32).amax(-1)
    assert torch.allclose(m, low, atol=0.05) and torch.allclose(d, (high - low) / 15, atol=0.01)


def reference(x: torch.Tensor, u, d, m, bias) -> torch.Tensor:
    """What the kernel computes, in float64: x quantized per block of 32 to int8 (scale max |x| / 127), times the
    dequantized weight."""
    rows, inputs = x.shape
    blocks = x.reshape(rows, -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks * torch.where(scale > 0, 1 / scale, 0))
    return F.linear((q * scale).reshape(rows, inputs).double(), quant.dequantize(u, d, m).double(),
                    None if bias is None else bias.double())


def _cases(bits: int):
    generator = torch.Generator().manual_seed(bits)
    for rows, outputs, inputs in SHAPES:
        weight = torch.randn(outputs, inputs, generator=generator) * 0.1
        u, d, m, _ = quant.quantize(weight, None, bits)
        x = torch.randn(rows, inputs, generator=generator) * 3
        x[0, :32] = 0  # a block of zeros: scale 0
        bias = torch.randn(outputs, generator=generator) if rows % 2 else None
        yield x, (u, d, m), quant.pack(u, d, m, bits), bias, outputs


@needs_compiler
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 vector extensions")
@pytest.mark.parametrize("flags", ["", "-mno-avx512vnni", "-mno-avx512vnni -mno-avxvnni", "-mno-avx512f",
                                   "-mno-avx2"])
@pytest.mark.parametrize("bits", [8, 4])
def test_the_kernel_on_each_path_matches_the_reference(monkeypatch, flags, bits):
    """The machine's own path and each narrower one: the same integers (exact on every path), float sums over the
    blocks within float32 rounding."""
    monkeypatch.setenv("CC", f"gcc {flags}")
    kernel = compile_kernels(4, 2, 16).qlinear
    if flags == "-mno-avx2":
        assert kernel.path == "plain C"
    elif flags == "-mno-avx512vnni -mno-avxvnni":
        assert kernel.path == "AVX2"
    for x, weight, packed, bias, outputs in _cases(bits):
        expected = reference(x, *weight, bias)
        got = kernel(x, packed, bias, outputs)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        # Batch invariance: each row alone gives the same bits as within the batch.
        assert torch.equal(kernel(x[-1:], packed, bias, outputs), got[-1:])


@needs_compiler
def test_the_kernel_refuses_what_it_was_not_packed_for():
    kernel = compile_kernels(4, 2, 16).qlinear
    x, _, packed, _, outputs = next(_cases(8))
    for bad in [(x.double(), packed, None, outputs), (x, packed, None, outputs + 16),
                (x[:, :16], packed, None, outputs),
                (x, packed[..., :-1], None, outputs), (x, packed.float(), None, outputs),
                (x, packed, torch.zeros(outputs + 1), outputs)]:
        with pytest.raises(ValueError, match="quantized linear kernel runs float32"):
            kernel(*bad)


@needs_compiler
def test_the_default_model_passes_the_quality_gate(default_model_path):
    """Its quantized weights (Q4_1, the head Q8_0) with int8 activations against float32, over 1,243 tokens:
    at least 95% of the top tokens the same, perplexity within 1%."""
    ids = load_tokenizer(default_model_path).encode(TEXT.read_text())
    quality = evaluate(default_model_path, ["auto"], ids)
    assert quality["auto"].agreement >= 0.95
    assert abs(quality["auto"].perplexity_change) <= 0.01


@needs_compiler
@pytest.mark.parametrize("quantization, least_cosine, least_agreement", [("int8", 0.99, 0.9), ("int4", 0.8, 0.6)])
def test_a_float_checkpoint_quantized_at_load(tmp_path, quantization, least_cosine, least_agreement):
    """A float checkpoint (fused projections, biases, a tied head) quantized at load: its logits stay close to
    float32's. A row or shard in the wrong place would leave them unrelated."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=160, hidden_size=128, intermediate_size=224, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                         mlp_bias=True, initializer_range=0.1)
    folder = tmp_path / "model"
    HFLlama(config).save_pretrained(folder)
    ids = torch.randint(0, 160, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    cpu = torch.device("cpu")
    expected = logits(load_model(folder, torch.float32, cpu, quantization="none"), ids)
    got = logits(load_model(folder, torch.float32, cpu, quantization=quantization), ids)
    assert F.cosine_similarity(got, expected, dim=-1).min() > least_cosine
    assert (got.argmax(-1) == expected.argmax(-1)).double().mean() >= least_agreement


def test_quantization_needs_the_native_kernels(default_model_path):
    with pytest.raises(ValueError, match="runs in the native kernels"):
        load_model(default_model_path, torch.float32, torch.device("cpu"), "torch", quantization="int8")
    with pytest.raises(ValueError, match="quantization must be one of"):
        load_model(default_model_path, torch.float32, torch.device("cpu"), quantization="fp8")
