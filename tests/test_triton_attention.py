"""The Triton paged-attention kernel (CUDA's) under Triton's CPU interpreter, against the PyTorch path: block sizes
1 and 16 and others, GQA ratios 1 and 3, contexts that end mid-block, prompts over a partly cached prefix beside
decoding sequences, and a model wired to it by `--kernel-backend triton`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():  # conftest.py sets it
    pytest.skip("Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1", allow_module_level=True)

from engine import LLM, SamplingParams  # noqa: E402
from models.attention import AttentionMetadata, PagedAttention  # noqa: E402
from models.triton_attention import TILE, TritonPagedAttention  # noqa: E402
from tests.helpers import tiny_llama  # noqa: E402
from tests.test_native_kernels import decode_case, paged_case  # noqa: E402


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [
    (9, 3, 64, 16),  # SmolLM2: GQA 3
    (4, 4, 32, 1),  # no grouping, one token per block
    (6, 2, 36, 5),  # a head of no power of two, blocks of no power of two
])
def test_decode_matches_the_pytorch_path(heads, kv_heads, head_dim, block_size):
    """Contexts of 1, 2, a block, a block and one, 37 and 300 tokens: most end mid-block."""
    (q, cache, tables, lens, scale), expected = decode_case(heads, kv_heads, head_dim, block_size)
    kernel = TritonPagedAttention(heads, kv_heads, head_dim)
    torch.testing.assert_close(kernel(q, cache, tables, lens, scale), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="paged attention takes"):
        kernel(q, cache, tables[1:], lens, scale)
    with pytest.raises(ValueError, match="paged attention takes"):
        kernel(q[..., 1:], cache, tables, lens, scale)


@pytest.mark.parametrize("heads, kv_heads, block_size, new_tokens, context", [
    (9, 3, 16, [TILE + 5, 9, 1, 1], [TILE + 5 + 27, 9, 20, 33]),
    (4, 4, 1, [TILE + 5, 9, 1, 1], [TILE + 5 + 27, 9, 20, 33]),
    # seven sequences whose tiles straddle TILE's multiples in the flat batch: the kernel's search for its sequence
    (4, 2, 5, [2 * TILE, TILE + 1, TILE - 1, 3, 2, 1, 1], [2 * TILE + 40, TILE + 1, TILE + 10, 3, 50, 7, 1]),
])
def test_prompts_over_a_cached_prefix_beside_decodes(heads, kv_heads, block_size, new_tokens, context):
    """Through PagedAttention.forward, as the runner calls it: prompt chunks of more than a tile of queries over
    partly cached prefixes, whole fresh prompts, then decoding sequences."""
    head_dim = 32
    _, cache, tables, _ = paged_case(heads, kv_heads, head_dim, block_size, context)
    generator = torch.Generator().manual_seed(2)
    tokens = sum(new_tokens)
    new = [torch.randn(tokens, h, head_dim, generator=generator) for h in (heads, kv_heads, kv_heads)]
    slots = [tables[i, p // block_size] * block_size + p % block_size
             for i, (n, c) in enumerate(zip(new_tokens, context)) for p in range(c - n, c)]
    prefills = sum(n > 1 for n in new_tokens)
    meta = AttentionMetadata(query_lens=new_tokens, context_lens=context, num_prefills=prefills,
                             slot_mapping=torch.tensor(slots), block_tables=tables,
                             decode_context_lens=torch.tensor(context[prefills:]))
    layer = PagedAttention(heads, kv_heads, head_dim)
    expected = layer(*new, cache.clone(), meta)
    layer.decode_kernel = TritonPagedAttention(heads, kv_heads, head_dim)
    torch.testing.assert_close(layer(*new, cache.clone(), meta), expected, rtol=1e-5, atol=1e-5)


def test_a_model_on_the_triton_backend_decodes_as_the_pytorch_path(tmp_path):
    """`--kernel-backend triton` gives every attention layer the Triton kernel (the rest runs in PyTorch): a random
    tiny Llama decodes the same greedy tokens as on the PyTorch path."""
    model = tiny_llama(tmp_path)
    prompts = [[1, 5, 9, 33, 2, 7, 100, 64, 3, 900, 31000], [1, 70, 71]]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(model), kernel_backend=backend, dtype="float32", block_size=4, num_kv_blocks=16)
        attention = llm.engine.runner.model.model.layers[0].self_attn.attn
        assert isinstance(attention.decode_kernel, TritonPagedAttention) == (backend == "triton")
        outputs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    assert outputs["triton"] == outputs["torch"]


@pytest.mark.parametrize("capability", [80, 90])  # A100, H100/H200
def test_the_kernel_compiles_for_nvidia_gpus(capability):
    """What the interpreter would let pass and the compiler would not: the kernel compiled to PTX and a cubin for
    the GPU, as the wrapper launches it, with no GPU at hand. In a process of its own: Triton builds its kernels for
    either the interpreter or a GPU, once per process."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tests.triton_compile", str(capability)], env=env,
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["bf16/1", "bf16/16", "fp32/16"]
