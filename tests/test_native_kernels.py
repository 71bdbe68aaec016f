"""The native CPU kernels (decode attention, RMSNorm, linear layers, the Llama decoder layer) against the PyTorch
paths they replace."""
import copy
import dataclasses
import logging
import os
import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from models import native
from models.attention import AttentionMetadata, PagedAttention
from models.config import config_from_hf
from models.llama import LlamaForCausalLM
from models.loader import _use_kernels
from models.native import compile_kernels, pick_kernels
from tests.conftest import CHAT_QUESTIONS, chat_prompt

# Without a compiler the server runs the PyTorch path; these tests need the kernels.
pytestmark = pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("gcc")), reason="no C compiler")


def paged_case(heads: int, kv_heads: int, head_dim: int, block_size: int, lengths: list[int]):
    """A cache of random keys and values, and sequences of `lengths` tokens in scattered blocks."""
    generator = torch.Generator().manual_seed(sum(lengths) + heads + block_size)
    blocks_per_seq = [-(-n // block_size) for n in lengths]
    num_blocks = sum(blocks_per_seq) + 5
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=generator)
    order = torch.randperm(num_blocks, generator=generator).tolist()
    width = max(blocks_per_seq)
    tables, start = [], 0
    for count in blocks_per_seq:
        tables.append(order[start:start + count] + [0] * (width - count))  # padded as the runner pads
        start += count
    q = torch.randn(len(lengths), heads, head_dim, generator=generator) * 3  # peaked and flat softmaxes both
    return q, cache, torch.tensor(tables), torch.tensor(lengths)


def decode_case(heads: int, kv_heads: int, head_dim: int, block_size: int):
    """A decode batch of lengths around the block size and the vector width, and the PyTorch path's output."""
    lengths = [1, 2, block_size, block_size + 1, 37, 300]
    q, cache, tables, lens = paged_case(heads, kv_heads, head_dim, block_size, lengths)
    reference = PagedAttention(heads, kv_heads, head_dim)
    meta = AttentionMetadata(query_lens=[1] * len(lengths), context_lens=lengths, num_prefills=0,
                             slot_mapping=torch.zeros(len(lengths), dtype=torch.long), block_tables=tables,
                             decode_context_lens=lens)
    return (q, cache, tables, lens, reference.scale), reference._decode(q, cache, tables, meta.decode_mask)


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [
    (9, 3, 64, 16),  # SmolLM2
    (4, 4, 32, 1),  # no grouping, one token per block
    (8, 2, 128, 16),
    (6, 1, 48, 32),  # multi-query, a head size that is no power of two
    (6, 2, 36, 5),  # a head that ends in a partial vector, blocks that are no multiple of the vector width
    (64, 8, 128, 16),  # a 70B model's heads: the per-thread arrays are largest
])
def test_kernel_matches_the_pytorch_path(heads, kv_heads, head_dim, block_size):
    (q, cache, tables, lens, scale), expected = decode_case(heads, kv_heads, head_dim, block_size)
    kernel = compile_kernels(heads, kv_heads, head_dim).paged_decode
    torch.testing.assert_close(kernel(q, cache, tables, lens, scale), expected, rtol=1e-5, atol=1e-5)
    # A non-contiguous query (as the model's split makes it) and a slice of the block tables read right.
    wide = torch.cat([q, q], dim=-1)[1:, :, :head_dim]
    torch.testing.assert_close(kernel(wide, cache, tables[1:], lens[1:], scale), expected[1:])
    with pytest.raises(ValueError, match="6 queries, 5 block tables and 5 lengths"):
        kernel(q, cache, tables[1:], lens[1:], scale)
    with pytest.raises(ValueError, match="compiled for"):
        kernel(q.double(), cache.double(), tables, lens, scale)
    with pytest.raises(ValueError, match="compiled for"):
        kernel(q, cache, tables.int(), lens, scale)
    with pytest.raises(ValueError, match="compiled for"):
        kernel(q, cache[:1], tables, lens, scale)


@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize("lengths", [[1], [300], [5, 77]])
def test_fewer_sequences_than_threads_split_their_tokens(threads, lengths):
    """Each sequence's tokens are cut into parts (some empty: 8 parts of 1 token) and merged afterwards."""
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    q, cache, tables, lens = paged_case(heads, kv_heads, head_dim, block_size, lengths)
    reference = PagedAttention(heads, kv_heads, head_dim)
    mask = (torch.arange(max(lengths))[None, :] < lens[:, None])[:, None, None, :]
    expected = reference._decode(q, cache, tables, mask)
    kernel = compile_kernels(heads, kv_heads, head_dim).paged_decode
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernel(q, cache, tables, lens, reference.scale)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_kernel_refuses_lengths_and_blocks_outside_the_tables():
    q, cache, tables, lens = paged_case(4, 2, 16, 4, [3, 9])
    kernel = compile_kernels(4, 2, 16).paged_decode
    for bad_lens in ([3, 0], [3, -1], [3, tables.shape[1] * 4 + 1]):
        with pytest.raises(ValueError, match="context length"):
            kernel(q, cache, tables, torch.tensor(bad_lens), 0.25)
    for bad_block in (-1, cache.shape[1]):
        bad = tables.clone()
        bad[1, 1] = bad_block
        with pytest.raises(ValueError, match="block id"):
            kernel(q, cache, bad, lens, 0.25)
        with pytest.raises(ValueError, match="block id"):  # one sequence, its tokens split between threads
            kernel(q[1:], cache, bad[1:], lens[1:], 0.25)
    bad = tables.clone()
    bad[0, -1] = -1  # padding past the sequence's blocks is never read
    torch.testing.assert_close(kernel(q, cache, bad, lens, 0.25), kernel(q, cache, tables, lens, 0.25))


def test_forward_with_prefills_and_decodes_in_one_batch():
    """PagedAttention.forward hands the kernel only the decoding sequences' rows, after writing the new K/V."""
    heads, kv_heads, head_dim, block_size = 6, 2, 32, 4
    lengths = [5, 1, 7, 12]  # tokens per sequence this step: two prefills, then two decodes
    context = [5, 1, 20, 33]
    q, cache, tables, _ = paged_case(heads, kv_heads, head_dim, block_size, context)
    generator = torch.Generator().manual_seed(1)
    tokens = sum(lengths[:2]) + 2
    new = [torch.randn(tokens, h, head_dim, generator=generator) for h in (heads, kv_heads, kv_heads)]
    slots = [tables[i, p // block_size] * block_size + p % block_size
             for i, (n, c) in enumerate(zip(lengths[:2] + [1, 1], context)) for p in range(c - n, c)]
    meta = AttentionMetadata(query_lens=lengths[:2] + [1, 1], context_lens=context, num_prefills=2,
                             slot_mapping=torch.tensor(slots), block_tables=tables,
                             decode_context_lens=torch.tensor(context[2:]))
    layer = PagedAttention(heads, kv_heads, head_dim)
    expected = layer(*new, cache.clone(), meta)
    layer.decode_kernel = compile_kernels(heads, kv_heads, head_dim).paged_decode
    torch.testing.assert_close(layer(*new, cache.clone(), meta), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 576), (64, 576), (3, 5, 13), (0, 64), (3000, 96)])  # the last runs threaded
def test_rms_norm_kernel_matches_pytorch(shape):
    generator = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(shape, generator=generator) * 4
    weight = torch.randn(shape[-1], generator=generator)
    kernel = compile_kernels(4, 2, 16).rms_norm
    expected = F.rms_norm(x, weight.shape, weight, 1e-5)
    torch.testing.assert_close(kernel(x, weight, 1e-5), expected, rtol=1e-5, atol=1e-5)
    if x.dim() == 2 and len(x):  # a column slice of a wider tensor, as a fused projection's output is
        wide = torch.cat([x, x], dim=-1)[:, shape[-1]:]
        torch.testing.assert_close(kernel(wide, weight, 1e-5), expected, rtol=1e-5, atol=1e-5)
    for bad_x, bad_weight in ((x.double(), weight), (x, weight.double()), (x, weight[1:]), (x, weight[None])):
        with pytest.raises(ValueError, match="RMSNorm kernel runs float32"):
            kernel(bad_x, bad_weight, 1e-5)


LINEAR_CASES = [(1, 70, 33, True), (2, 33, 17, False), (3, 130, 64, True), (4, 300, 20, True), (7, 64, 576, False),
                (12, 32, 8, True), (13, 1, 5, True), (64, 960, 576, True), (200, 100, 40, False),
                (0, 10, 8, True)]  # up to 4 rows: panels side by side; 200 rows: two blocks of rows


def linear_inputs(rows: int, outputs: int, inputs: int, bias: bool):
    """x, weight and bias (or None) of one LINEAR_CASES entry, seeded."""
    generator = torch.Generator().manual_seed(rows + outputs)
    x, weight = torch.randn(rows, inputs, generator=generator), torch.randn(outputs, inputs, generator=generator)
    return x, weight, torch.randn(outputs, generator=generator) if bias else None


@pytest.mark.parametrize("rows,outputs,inputs,bias", LINEAR_CASES)
def test_linear_kernel_matches_f_linear(rows, outputs, inputs, bias):
    x, weight, b = linear_inputs(rows, outputs, inputs, bias)
    kernel = compile_kernels(4, 2, 16).linear
    packed = kernel.pack(weight)
    assert packed.shape == (-(-outputs // kernel.panel), inputs, kernel.panel)
    assert torch.equal(kernel.unpack(packed, outputs), weight)
    expected = F.linear(x, weight, b)
    kernel.max_rows = 10 ** 6  # the native product at every size
    torch.testing.assert_close(kernel(x, packed, b, outputs), expected, rtol=1e-4, atol=1e-4)
    kernel.max_rows = 0  # MKL's over the unpacked weight
    torch.testing.assert_close(kernel(x, packed, b, outputs), expected, rtol=1e-4, atol=1e-4)


def test_linear_kernel_takes_any_leading_shape_and_refuses_bad_inputs():
    kernel = compile_kernels(4, 2, 16).linear
    x, weight, bias = torch.randn(2, 3, 40), torch.randn(50, 40), torch.randn(50)
    packed = kernel.pack(weight)
    torch.testing.assert_close(kernel(x, packed, bias, 50), F.linear(x, weight, bias), rtol=1e-4, atol=1e-4)
    for bad in ((x[..., 1:], packed, bias, 50), (x.double(), packed, bias, 50), (x, packed, bias[1:], 50),
                (x, packed, bias, 50 + kernel.panel), (x, weight, None, 50), (x, packed, torch.randn(100)[::2], 50)):
        with pytest.raises(ValueError, match="linear kernel runs float32"):
            kernel(*bad)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 vector extensions")
@pytest.mark.parametrize("flag,panel", [("-mno-avx512f", 16), ("-mno-avx", 8)])
def test_kernels_on_narrower_vectors(monkeypatch, flag, panel):
    """Machines without AVX-512 (or AVX) get narrower panels, fewer rows per tile and a shorter tree of lane sums
    from the same source."""
    monkeypatch.setenv("CC", f"gcc {flag}")
    kernel = compile_kernels(4, 2, 16).linear
    assert kernel.panel == panel
    for rows, outputs, inputs, bias in LINEAR_CASES:
        x, weight, b = linear_inputs(rows, outputs, inputs, bias)
        torch.testing.assert_close(kernel(x, kernel.pack(weight), b, outputs), F.linear(x, weight, b),
                                   rtol=1e-4, atol=1e-4)
    for heads, kv_heads, head_dim, block_size in [(9, 3, 64, 16), (6, 1, 36, 5)]:
        inputs, expected = decode_case(heads, kv_heads, head_dim, block_size)
        attention = compile_kernels(heads, kv_heads, head_dim).paged_decode
        torch.testing.assert_close(attention(*inputs), expected, rtol=1e-5, atol=1e-5)


def random_llama(heads: int, kv_heads: int, head_dim: int, bias: bool) -> LlamaForCausalLM:
    """A one-layer Llama of random weights (norms and biases too), on the PyTorch path."""
    cfg = config_from_hf({"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 1, "vocab_size": 50,
                          "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
                          "attention_bias": bias, "mlp_bias": bias})
    model = LlamaForCausalLM(cfg)
    generator = torch.Generator().manual_seed(heads + head_dim)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + ("norm" in name))
    return model


def layer_decode_case(model: LlamaForCausalLM):
    """A decode step of three sequences of mixed context lengths for `random_llama`'s layer: (x, rotation, cache,
    meta)."""
    attention = model.model.layers[0].self_attn.attn
    block_size, lengths = 4, [1, 9, 40]
    _, cache, tables, lens = paged_case(attention.num_heads, attention.num_kv_heads, attention.head_dim, block_size,
                                        lengths)
    positions = lens - 1
    slots = tables[torch.arange(3), positions // block_size] * block_size + positions % block_size
    meta = AttentionMetadata(query_lens=[1] * 3, context_lens=lengths, num_prefills=0, slot_mapping=slots,
                             block_tables=tables, decode_context_lens=lens)
    return torch.randn(3, 48, generator=torch.Generator().manual_seed(0)), model.rotary(positions), cache, meta


@pytest.mark.parametrize("heads, kv_heads, head_dim, bias", [(9, 3, 64, False), (4, 2, 16, True), (6, 1, 24, True)])
def test_decoder_layer_kernel_matches_the_layer_steps(heads, kv_heads, head_dim, bias):
    """The one-call decoder layer against the layer's own steps on the PyTorch path: a decode batch of mixed
    context lengths, the same output and the same new keys and values in the cache."""
    model = random_llama(heads, kv_heads, head_dim, bias)
    reference = copy.deepcopy(model.model.layers[0])
    _use_kernels(model, compile_kernels(heads, kv_heads, head_dim))
    layer = model.model.layers[0]
    assert layer.decode_kernel is not None
    x, rotation, cache, meta = layer_decode_case(model)
    expected_cache, got_cache = cache.clone(), cache.clone()
    with torch.inference_mode():
        expected = reference(x, rotation, expected_cache, meta)
        torch.testing.assert_close(layer(x, rotation, got_cache, meta), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_cache, expected_cache, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got_cache, cache)  # the new keys and values were written

    bad_slots = dataclasses.replace(meta, slot_mapping=torch.tensor([0, 1, cache[0].numel()]))
    with pytest.raises(ValueError, match="cache slot outside"):
        layer.decode_kernel(x, rotation, got_cache, bad_slots)
    torch.testing.assert_close(got_cache, expected_cache, rtol=1e-5, atol=1e-5)  # nothing written
    bad_metas = (dataclasses.replace(meta, num_prefills=1),
                 dataclasses.replace(meta, block_tables=meta.block_tables.int()))
    for bad in ((x.double(), rotation, got_cache, meta), (x[:2], rotation, got_cache, meta),
                (x, rotation, got_cache[..., 1:], meta), *((x, rotation, got_cache, m) for m in bad_metas)):
        with pytest.raises(ValueError, match="decoder layer kernel takes"):
            layer.decode_kernel(*bad)


def test_loading_the_kernels_keeps_subnormal_floats():
    """Built with -ffast-math, the library must not switch the process to flush-to-zero (gcc's crtfastmath)."""
    compile_kernels(4, 2, 16)
    tiny = float.fromhex("0x0.0000000000001p-1022")  # the smallest subnormal double
    assert tiny + tiny > 0
    assert (torch.tensor([1e-40]) * 1).item() > 0


def test_a_second_openmp_runtime_means_no_kernels(monkeypatch):
    assert any("gomp" in path for path in native._openmp_runtimes())  # torch's own is seen
    seen = iter([set(), {"/usr/lib/x86_64-linux-gnu/libgomp.so.1"}])  # before and after loading the kernels
    monkeypatch.setattr(native, "_openmp_runtimes", lambda: next(seen))
    with pytest.raises(RuntimeError, match="their own OpenMP runtime"):
        compile_kernels(4, 2, 16)


def test_backend_choice(monkeypatch, caplog):
    cfg = config_from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "num_hidden_layers": 1, "intermediate_size": 128,
                          "vocab_size": 100})
    cpu, f32 = torch.device("cpu"), torch.float32
    assert pick_kernels("torch", cfg, f32, cpu) is None
    assert pick_kernels("auto", cfg, torch.float16, cpu) is None  # float32 or bfloat16 weights only
    assert pick_kernels("auto", cfg, f32, cpu, torch.float16) is None  # and caches
    assert pick_kernels("auto", cfg, f32, torch.device("cuda")) is None
    assert pick_kernels("auto", cfg, f32, cpu) is not None
    assert pick_kernels("auto", cfg, torch.bfloat16, cpu, torch.bfloat16).paged_decode.cache_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float32 or bfloat16 weights and KV cache"):
        pick_kernels("native", cfg, torch.float16, cpu)
    with pytest.raises(ValueError, match="one of"):
        pick_kernels("flash", cfg, f32, cpu)
    monkeypatch.setenv("CC", "env false")  # a compiler command (of two words) that always fails
    with caplog.at_level(logging.WARNING):
        assert pick_kernels("auto", cfg, f32, cpu) is None
    assert "slower PyTorch path" in caplog.text
    with pytest.raises(RuntimeError, match="failed"):
        pick_kernels("native", cfg, f32, cpu)


def test_both_backends_decode_the_same_greedy_tokens(default_model_path, llm_float32):
    """The real model in float32, a batch of mixed lengths decoding together: the kernels (the default on the CPU)
    and the PyTorch path give the same tokens."""
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    prompts = [chat_prompt(q) for q in CHAT_QUESTIONS[:4]]
    torch_path = LLM(str(default_model_path), kernel_backend="torch", dtype="float32", block_size=4)
    layer = llm_float32.engine.runner.model.model.layers[0]
    assert layer.self_attn.attn.decode_kernel is not None and layer.input_layernorm.kernel is not None
    assert layer.mlp.down_proj.kernel is not None and llm_float32.engine.runner.model.lm_head.kernel is not None
    assert layer.decode_kernel is not None
    torch_model = torch_path.engine.runner.model
    assert torch_model.model.norm.kernel is None and torch_model.lm_head is None  # tied: the embedding's weight
    assert [o.outputs[0].token_ids for o in llm_float32.generate(prompts, params)] == \
        [o.outputs[0].token_ids for o in torch_path.generate(prompts, params)]
