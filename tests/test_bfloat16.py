"""bfloat16 on the CPU: the linear kernel on each path (AMX, AVX-512 BF16, float32 widening) against a reference,
attention over a bfloat16 KV cache, the quality gate for both, and how `--dtype auto` and `--kv-cache-dtype auto`
resolve."""
import copy
import ctypes
import os
import platform
import shutil
from pathlib import Path

import openai
import pytest
import torch

from engine import LLM, SamplingParams
from engine import runner
from models.loader import _use_kernels
from models.native import bfloat16_features, compile_kernels
from models.quality import TEXT, evaluate
from models.tokenizer import load_tokenizer
from server.cli import configs
from server.flags import parse_args
from tests.conftest import chat_prompt
from tests.helpers import running_server
from tests.test_native_kernels import layer_decode_case, paged_case, random_llama

pytestmark = pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("gcc")), reason="no C compiler")
x86 = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 vector extensions")
# (rows, outputs, inputs, bias): a decode row, an odd k (no AMX tiles: k is no multiple of 32), a partial row tile
# and a partial panel, two row tiles and an odd number of panels, a prompt.
CASES = [(1, 16, 32, False), (3, 37, 95, True), (13, 200, 576, True), (40, 80, 64, False), (70, 45, 1536, True)]
# The machine's own path, then narrower ones: without AMX, without AVX-512 BF16 (widened), narrower vectors.
NARROWER = ["-mno-amx-tile", "-mno-amx-tile -mno-avx512bf16", "-mno-amx-tile -mno-avx512f",
            "-mno-amx-tile -mno-avx2"]


def _cases():
    generator = torch.Generator().manual_seed(0)
    for rows, outputs, inputs, bias in CASES:
        yield (torch.randn(rows, inputs, generator=generator), torch.randn(outputs, inputs, generator=generator),
               torch.randn(outputs, generator=generator) if bias else None, outputs)


def _amx_lent() -> bool:
    """Whether Linux lends this process AMX's tile registers (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, as the
    kernel asks; a container's seccomp profile may refuse it)."""
    return ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18) == 0  # 158: arch_prctl on x86-64


def _reference(x, weight, bias):
    """What the kernel computes: inputs and weights rounded to bfloat16, products summed in float64."""
    out = x.bfloat16().double() @ weight.bfloat16().double().T
    return out if bias is None else out + bias.double()


@x86
@pytest.mark.parametrize("flags", ["", *NARROWER])
def test_the_bfloat16_kernel_on_each_path_matches_the_reference(monkeypatch, flags):
    monkeypatch.setenv("CC", f"gcc {flags}")
    kernel = compile_kernels(4, 2, 16).bf16linear
    if flags == "-mno-amx-tile":
        assert kernel.path in ("AVX-512 BF16", "bfloat16 widened to float32")
    elif flags:
        assert kernel.path == "bfloat16 widened to float32"
    elif bfloat16_features() == "AMX" and _amx_lent():
        assert kernel.path == "AMX"
    for x, weight, bias, outputs in _cases():
        got = kernel(x, kernel.pack(weight), bias, outputs)
        assert got.dtype == torch.float32 and got.shape == (len(x), outputs)
        # Float32 sums over up to 1,536 products of outputs of ~40: within 1e-4.
        torch.testing.assert_close(got.double(), _reference(x, weight, bias), rtol=1e-5, atol=1e-4)
        # Batch invariance: the last row alone gives the same bits as within the batch.
        assert torch.equal(kernel(x[-1:], kernel.pack(weight), bias, outputs), got[-1:])


@x86
def test_the_paths_without_tiles_agree_bit_for_bit(monkeypatch):
    """`vdpbf16ps` and the widened float32 arithmetic add the same products in the same order, each rounded once:
    on Intel's CPUs (as its manual specifies, and checked), the same bits; elsewhere (AMD's implementation is not
    checked here) within float32 rounding."""
    results = []
    for flags in NARROWER[:2]:
        monkeypatch.setenv("CC", f"gcc {flags}")
        kernel = compile_kernels(4, 2, 16).bf16linear
        results.append([kernel(x, kernel.pack(w), b, n) for x, w, b, n in _cases()])
    for tiles_off, widened in zip(*results):
        torch.testing.assert_close(tiles_off, widened, rtol=1e-6, atol=1e-5)
        assert torch.equal(tiles_off, widened) or "GenuineIntel" not in Path("/proc/cpuinfo").read_text()


def test_the_bfloat16_kernel_refuses_what_it_was_not_packed_for():
    kernel = compile_kernels(4, 2, 16).bf16linear
    x, weight, _, outputs = next(_cases())
    packed = kernel.pack(weight)
    for bad in [(x.double(), packed, None, outputs), (x, packed, None, outputs + 16),
                (x[:, :16], packed, None, outputs), (x, packed.float(), None, outputs),
                (x, packed[..., :-2], None, outputs), (x, packed, torch.zeros(outputs + 1), outputs)]:
        with pytest.raises(ValueError, match="bfloat16 linear kernel runs"):
            kernel(*bad)


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [(9, 3, 64, 16), (6, 2, 36, 5)])
def test_attention_over_a_bfloat16_cache_is_attention_over_its_values(heads, kv_heads, head_dim, block_size):
    """The bfloat16 cache is widened exactly as it is read: the same bits as the float32 kernel over a float32
    cache holding the same (rounded) values. Prompts' queries too (several per sequence)."""
    lengths = [1, block_size + 1, 300, 600]
    q, cache, tables, lens = paged_case(heads, kv_heads, head_dim, block_size, lengths)
    cache = cache.bfloat16()
    narrow = compile_kernels(heads, kv_heads, head_dim, torch.bfloat16).paged_decode
    wide = compile_kernels(heads, kv_heads, head_dim).paged_decode
    assert torch.equal(narrow(q, cache, tables, lens, 0.125), wide(q, cache.float(), tables, lens, 0.125))
    starts = torch.tensor([0, 1, 3, 4, 8])
    queries = torch.cat([q, q])
    assert torch.equal(narrow(queries, cache, tables, lens, 0.125, starts),
                       wide(queries, cache.float(), tables, lens, 0.125, starts))
    with pytest.raises(ValueError, match="compiled for"):
        narrow(q, cache.float(), tables, lens, 0.125)


@pytest.mark.parametrize("heads, kv_heads, head_dim, bias", [(9, 3, 64, False), (6, 1, 24, True)])
def test_decoder_layer_in_bfloat16(heads, kv_heads, head_dim, bias):
    """The one-call Llama layer with bfloat16 linear weights and a bfloat16 cache against the layer's float32
    PyTorch steps: close (to bfloat16's precision), and the new keys and values written rounded."""
    model = random_llama(heads, kv_heads, head_dim, bias)
    reference = copy.deepcopy(model.model.layers[0])
    _use_kernels(model, compile_kernels(heads, kv_heads, head_dim, torch.bfloat16), dtype=torch.bfloat16)
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.bfloat16
    x, rotation, cache, meta = layer_decode_case(model)
    expected_cache, got_cache = cache.bfloat16().float(), cache.bfloat16()
    with torch.inference_mode():
        expected = reference(x, rotation, expected_cache, meta)
        got = layer(x, rotation, got_cache, meta)
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
    assert torch.nn.functional.cosine_similarity(got, expected).min() > 0.999
    torch.testing.assert_close(got_cache.float(), expected_cache, rtol=0.02, atol=0.02)
    assert not torch.equal(got_cache, cache.bfloat16())  # the new keys and values were written


def test_the_default_model_in_bfloat16_passes_the_quality_gate(default_model_path):
    """bfloat16 linear weights, a bfloat16 cache, and the quantized weights with a bfloat16 cache (the default on
    a CPU with bfloat16 products), against float32 over 1,243 tokens: at least 95% of the top tokens the same,
    perplexity within 1%."""
    ids = load_tokenizer(default_model_path).encode(TEXT.read_text())
    for name, quality in evaluate(default_model_path, ["bfloat16", "kv-bfloat16", "auto+kv-bfloat16"], ids).items():
        assert quality.agreement >= 0.95, name
        assert abs(quality.perplexity_change) <= 0.01, name


def test_the_engine_runs_bfloat16_weights_and_cache(default_model_path, caplog):
    llm = LLM(str(default_model_path), quantization="none", dtype="bfloat16", kv_cache_dtype="bfloat16",
              max_model_len=256, num_kv_blocks=64)
    runner_ = llm.engine.runner
    assert {cache.dtype for cache in runner_.kv_caches} == {torch.bfloat16}
    assert runner_.model.lm_head.weight.dtype == torch.bfloat16
    prompts = [chat_prompt("What is the capital of Japan?"), chat_prompt("Name a colour.")]
    greedy = SamplingParams(temperature=0, max_tokens=12)
    together = llm.generate(prompts, greedy)
    assert "Tokyo" in together[0].outputs[0].text
    alone = llm.generate(prompts[:1], greedy)  # batch-invariant in bfloat16 too
    assert alone[0].outputs[0].token_ids == together[0].outputs[0].token_ids


def test_auto_picks_bfloat16_where_the_cpu_multiplies_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runner, "bfloat16_features", lambda: "AMX")
    assert runner.resolve_dtype("auto", cpu, torch.float32) == torch.bfloat16
    assert runner.resolve_dtype("auto", cpu, torch.float32, "torch") == torch.float32  # not the whole model
    assert runner.resolve_dtype("float32", cpu, torch.float32) == torch.float32
    monkeypatch.setattr(runner, "bfloat16_features", lambda: "")
    assert runner.resolve_dtype("auto", cpu, torch.bfloat16) == torch.float32
    assert runner.resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert runner.resolve_kv_cache_dtype("auto", torch.float32) == torch.float32
    assert runner.resolve_kv_cache_dtype("bfloat16", torch.float32) == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        runner.resolve_kv_cache_dtype("fp8", torch.float32)
    with pytest.raises(ValueError, match="dtype must be"):
        runner.resolve_dtype("int8", cpu, torch.float32)
    engine, _ = configs(parse_args(["--dtype", "bfloat16", "--kv-cache-dtype", "bfloat16"]))
    assert (engine.dtype, engine.kv_cache_dtype) == ("bfloat16", "bfloat16")
    with pytest.raises(SystemExit):
        parse_args(["--kv-cache-dtype", "fp8"])


def test_the_kernel_benchmark_runs_each_kernel(capsys):
    from models import bench_linear
    bench_linear.main(["--rows", "1", "3", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert "float32" in lines[1] and "bfloat16" in lines[1] and "int4" in lines[1]
    assert len(lines) == 2 + 4 * 2  # four shapes, two row counts
    assert all(line.count("GF/s") == 4 for line in lines[2:])


def test_the_server_serves_bfloat16_weights_and_cache(default_model_path):
    """The flags through a real server and the SDK, streaming and not."""
    with running_server("--model", str(default_model_path), "--served-model-name", "smol", "--max-model-len", "256",
                        "--quantization", "none", "--dtype", "bfloat16", "--kv-cache-dtype", "bfloat16") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        question = [{"role": "user", "content": "What is the capital of Japan?"}]
        whole = client.chat.completions.create(model="smol", messages=question, max_tokens=12, temperature=0)
        assert "Tokyo" in whole.choices[0].message.content
        stream = client.chat.completions.create(model="smol", messages=question, max_tokens=12, temperature=0,
                                                stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed == whole.choices[0].message.content
