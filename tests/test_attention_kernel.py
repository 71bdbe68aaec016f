"""The native CPU decode-attention kernel against the PyTorch path it replaces."""
import logging

import pytest
import torch

from engine import LLM, SamplingParams
from models.attention import AttentionMetadata, PagedAttention
from models.native import compile_paged_decode, decode_kernel
from tests.conftest import CHAT_QUESTIONS, chat_prompt


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


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [
    (9, 3, 64, 16),  # SmolLM2
    (4, 4, 32, 1),  # no grouping, one token per block
    (8, 2, 128, 16),
    (6, 1, 48, 32),  # multi-query, a head size that is no power of two
])
def test_kernel_matches_the_pytorch_path(heads, kv_heads, head_dim, block_size):
    lengths = [1, 2, block_size, block_size + 1, 37, 300]
    q, cache, tables, lens = paged_case(heads, kv_heads, head_dim, block_size, lengths)
    reference = PagedAttention(heads, kv_heads, head_dim)
    meta = AttentionMetadata(query_lens=[1] * len(lengths), context_lens=lengths, num_prefills=0,
                             slot_mapping=torch.zeros(len(lengths), dtype=torch.long), block_tables=tables,
                             decode_context_lens=lens)
    expected = reference._decode(q, cache, tables, meta.decode_mask)
    kernel = compile_paged_decode(heads, kv_heads, head_dim)
    torch.testing.assert_close(kernel(q, cache, tables, lens, reference.scale), expected, rtol=1e-5, atol=1e-5)
    # A non-contiguous query (as the model's split makes it) and a slice of the block tables read right.
    wide = torch.cat([q, q], dim=-1)[1:, :, :head_dim]
    torch.testing.assert_close(kernel(wide, cache, tables[1:], lens[1:], reference.scale), expected[1:])
    with pytest.raises(ValueError, match="6 queries, 5 block tables and 5 lengths"):
        kernel(q, cache, tables[1:], lens[1:], reference.scale)
    with pytest.raises(ValueError, match="compiled for"):
        kernel(q.double(), cache.double(), tables, lens, reference.scale)
    with pytest.raises(ValueError, match="compiled for"):
        kernel(q, cache, tables.int(), lens, reference.scale)


def test_loading_the_kernel_keeps_subnormal_floats():
    """Built with -ffast-math, the library must not switch the process to flush-to-zero (gcc's crtfastmath)."""
    compile_paged_decode(4, 2, 16)
    assert 5e-324 + 0.0 > 0
    assert (torch.tensor([1e-40]) * 1).item() > 0


def test_backend_choice(monkeypatch, caplog):
    from models.config import config_from_hf
    cfg = config_from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "num_hidden_layers": 1, "intermediate_size": 128,
                          "vocab_size": 100})
    cpu, f32 = torch.device("cpu"), torch.float32
    assert decode_kernel("torch", cfg, f32, cpu) is None
    assert decode_kernel("auto", cfg, torch.bfloat16, cpu) is None  # the kernel is float32 only
    assert decode_kernel("auto", cfg, f32, torch.device("cuda")) is None
    assert decode_kernel("auto", cfg, f32, cpu) is not None
    with pytest.raises(ValueError, match="float32 on the CPU only"):
        decode_kernel("native", cfg, torch.float16, cpu)
    with pytest.raises(ValueError, match="one of"):
        decode_kernel("flash", cfg, f32, cpu)
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with caplog.at_level(logging.WARNING):
        assert decode_kernel("auto", cfg, f32, cpu) is None
    assert "slower PyTorch path" in caplog.text
    with pytest.raises(RuntimeError, match="failed"):
        decode_kernel("native", cfg, f32, cpu)


def test_both_backends_decode_the_same_greedy_tokens(default_model_path, llm):
    """The real model, a batch of mixed lengths decoding together: the kernel (the default on the CPU)
    and the PyTorch path give the same tokens."""
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    prompts = [chat_prompt(q) for q in CHAT_QUESTIONS[:4]]
    torch_path = LLM(str(default_model_path), attention_backend="torch", block_size=4)
    assert llm.engine.runner.model.model.layers[0].self_attn.attn.decode_kernel is not None
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == \
        [o.outputs[0].token_ids for o in torch_path.generate(prompts, params)]
