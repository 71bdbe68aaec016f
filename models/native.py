"""Native CPU kernels (`kernels/*.c`), compiled at start for the model at hand with the machine's C
compiler into one library and called through ctypes:

- attention (`paged_decode.c`) reads keys and values in place from the block pool, where the PyTorch path
  first copies each sequence's blocks out; every token, a prompt's too, is a query over its own sequence's cache;
- RMSNorm (`rms_norm.c`) in one pass, where PyTorch runs six operations; SiLU of a gate times its up projection
  (`llama_layer.c`'s, for MLPs outside the Llama layer kernel);
- linear layers (`linear.c`) over weights repacked at load into column panels: for decode-sized batches
  (up to a few hundred rows) faster than MKL's sgemm, by 1.3-1.8x at 4-8 rows;
- a whole Llama decoder layer (`llama_layer.c`), calling the others: one call per layer where the layer's
  PyTorch steps dispatch ~14 operations.

They make a model's output batch-invariant: each token's hidden states and logits are the same bits whatever
else runs in the step, however its prompt is cut into chunks, and whether its earlier keys and values were computed
in this request or another (the prefix cache). Each kernel computes a row (a token) with arithmetic that depends on
that row alone: the products accumulate every output over the inputs in one order whatever the number of rows (MKL's
sgemm does not: its blocking, and so its rounding, changes with the number of rows), and attention cuts a context
into parts at fixed places (see `paged_decode.c`). A Llama layer is one call of them; the other architectures'
steps run in PyTorch between the kernels, with PyTorch operations that compute each element or row alike wherever
it falls (layer norms, complex products, sums), and the native SiLU, as PyTorch's is not (see `SiluMulKernel`).

Without a compiler the PyTorch path runs instead (slower, same results within float32 rounding). The
kernels run on torch's own OpenMP threads: torch has loaded libgomp before the library is, so it binds
to that one (checked: with a second OpenMP runtime the two thread pools would fight over the cores, and
the PyTorch path is used instead).
"""
import ctypes
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.config import ModelConfig
from models.native_linear import Bf16LinearKernel, LinearKernel, QuantizedLinearKernel, raise_for
from models.options import KERNEL_BACKENDS

log = logging.getLogger(__name__)

_SOURCES = sorted((Path(__file__).parent / "kernels").glob("*.c"))
# -ffast-math lets the reductions and exp vectorize. It must not reach the link: gcc would then add
# crtfastmath.o, whose start-up code flushes subnormal floats to zero in the whole process.
_COMPILE = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c"]
_LINK = ["-shared", "-fopenmp"]
_CACHE_DTYPES = {torch.float32: [], torch.bfloat16: ["-DCACHE_BF16"]}  # the -D flags for each
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)  # float, bfloat16 and quantized linear weights
def _is_cache(cache: torch.Tensor, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether `cache` is a KV cache as the kernels were compiled for: [2, blocks, block_size, kv heads, head_dim],
    of their cache dtype, on the CPU, contiguous."""
    return cache.dtype == dtype and cache.is_cpu and cache.dim() == 5 and cache.is_contiguous() \
        and (cache.shape[0], *cache.shape[3:]) == (2, num_kv_heads, head_dim)


class PagedDecodeKernel:
    """(q [queries, heads, head_dim], cache, block_tables [seqs, width], context_lens [seqs], scale, query_starts
    [seqs + 1]) -> [queries, heads, head_dim]. Sequence s's queries are q[query_starts[s]:query_starts[s + 1]]: the
    last sees its first context_lens[s] cached tokens, each one before it one token fewer (a prompt's chunk, its
    keys and values already in the cache). Without query_starts, one query per sequence (decoding)."""

    def __init__(self, library: ctypes.CDLL, num_heads: int, num_kv_heads: int, head_dim: int,
                 cache_dtype: torch.dtype):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.cache_dtype = cache_dtype
        self._run = library.paged_decode
        self._run.restype = ctypes.c_int
        self._run.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]

    def __call__(self, q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float, query_starts: torch.Tensor | None = None) -> torch.Tensor:
        if query_starts is None:
            query_starts = torch.arange(len(q) + 1)
        self._check(q, cache, block_tables, context_lens, query_starts)
        q, block_tables, context_lens = q.contiguous(), block_tables.contiguous(), context_lens.contiguous()
        query_starts = query_starts.contiguous()
        out = torch.empty_like(q)
        status = self._run(q.data_ptr(), cache.data_ptr(), block_tables.data_ptr(), query_starts.data_ptr(),
                           context_lens.data_ptr(), out.data_ptr(), len(block_tables), len(q), cache.shape[1],
                           cache.shape[2], block_tables.shape[1], scale, torch.get_num_threads())
        raise_for(status)
        return out

    def _check(self, q, cache, block_tables, context_lens, query_starts) -> None:
        """The kernel trusts the layout it was compiled for (a mismatch reads or writes out of bounds): check it.
        Query starts, lengths and block ids are checked by the kernel itself."""
        if not len(block_tables) == len(context_lens) == len(query_starts) - 1:
            raise ValueError(f"{len(q)} queries, {len(block_tables)} block tables and {len(context_lens)} lengths")
        if q.dtype != torch.float32 or not q.is_cpu or q.shape[1:] != (self.num_heads, self.head_dim) \
                or not _is_cache(cache, self.num_kv_heads, self.head_dim, self.cache_dtype) \
                or (block_tables.dtype, context_lens.dtype, query_starts.dtype) != (torch.int64,) * 3 \
                or not (block_tables.is_cpu and context_lens.is_cpu and query_starts.is_cpu):
            raise ValueError(f"the kernel runs float32 on the CPU, compiled for {self.num_heads} query heads and a "
                             f"contiguous cache of {self.num_kv_heads} KV heads of {self.head_dim}, with int64 block "
                             f"tables, lengths and query starts; got q {tuple(q.shape)} {q.dtype}, cache "
                             f"{tuple(cache.shape)} {cache.dtype} (contiguous: {cache.is_contiguous()}), "
                             f"{block_tables.dtype} block tables, {context_lens.dtype} lengths, {query_starts.dtype} "
                             f"query starts")


class RMSNormKernel:
    """(x [..., dim], weight [dim], eps) -> RMSNorm of x, as F.rms_norm."""

    def __init__(self, library: ctypes.CDLL):
        self._run = library.rms_norm
        self._run.restype = None
        self._run.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if x.dtype != torch.float32 or weight.dtype != torch.float32 or not x.is_cpu or not weight.is_cpu \
                or weight.dim() != 1 or not x.shape[-1] == weight.shape[0] > 0:
            raise ValueError(f"the RMSNorm kernel runs float32 on the CPU with a weight of the last dimension's "
                             f"size; got x {tuple(x.shape)} {x.dtype} on {x.device}, weight {tuple(weight.shape)} "
                             f"{weight.dtype} on {weight.device}")
        x, weight = x.contiguous(), weight.contiguous()
        out = torch.empty_like(x)
        dim = weight.shape[0]
        self._run(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps,
                  torch.get_num_threads())
        return out


class SiluMulKernel:
    """gate_up [..., 2 * width], the gate's columns then the up projection's -> silu(gate) * up [..., width]. Each row
    has the same bits whatever the other rows: F.silu's do not (it splits the elements between threads anywhere, and
    its vectorized exp rounds differently from its scalar one, which ends each thread's share)."""

    def __init__(self, library: ctypes.CDLL):
        self._run = library.silu_mul
        self._run.restype = None
        self._run.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        if gate_up.dtype != torch.float32 or not gate_up.is_cpu or gate_up.shape[-1] % 2:
            raise ValueError(f"the SiLU kernel runs float32 on the CPU over an even last dimension; got "
                             f"{tuple(gate_up.shape)} {gate_up.dtype} on {gate_up.device}")
        gate_up = gate_up.contiguous()
        width = gate_up.shape[-1] // 2
        out = torch.empty(*gate_up.shape[:-1], width)
        self._run(gate_up.data_ptr(), out.data_ptr(), out.numel() // width if width else 0, width,
                  torch.get_num_threads())
        return out


class _Matrix(ctypes.Structure):
    """`struct matrix` of llama_layer.c."""
    _fields_ = [("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("bits", ctypes.c_int64)]

    @classmethod
    def of(cls, linear) -> "_Matrix":
        bits = linear.kernel.bits(linear.weight) if isinstance(linear.kernel, QuantizedLinearKernel) \
            else 16 if isinstance(linear.kernel, Bf16LinearKernel) else 32
        return cls(linear.weight.data_ptr(), None if linear.bias is None else linear.bias.data_ptr(), bits)


class _LayerWeights(ctypes.Structure):
    """`struct llama_layer` of llama_layer.c."""
    _fields_ = [("input_norm", ctypes.c_void_p), ("qkv", _Matrix), ("o", _Matrix), ("post_norm", ctypes.c_void_p),
                ("gate_up", _Matrix), ("down", _Matrix), ("hidden", ctypes.c_int64), ("intermediate", ctypes.c_int64),
                ("eps", ctypes.c_float)]


class LlamaLayerKernel:
    """A whole Llama decoder layer for any step (prompt chunks and decode tokens together), in one call.
    `bind(layer)` gives the layer its kernel: (x [tokens, hidden], rotation, cache, meta) -> the layer's output, as
    its forward computes it. The layer's linear weights must already be packed for `LinearKernel`; the kernel keeps
    pointers to the layer's tensors, so they must not be replaced afterwards."""

    def __init__(self, library: ctypes.CDLL, num_heads: int, num_kv_heads: int, head_dim: int,
                 cache_dtype: torch.dtype):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.cache_dtype = cache_dtype
        self._run = library.llama_layer_forward
        self._run.restype = ctypes.c_int
        self._run.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] \
            + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
        self._scratch = library.llama_layer_scratch
        self._scratch.restype = ctypes.c_int64
        self._scratch.argtypes = [ctypes.c_int64] * 3

    def bind(self, layer) -> "BoundLlamaLayer":
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        tensors = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight] \
            + [t for m in linears for t in (m.weight, m.bias)]
        shapes = (attn.attn.num_heads, attn.attn.num_kv_heads, attn.attn.head_dim)
        if shapes != (self.num_heads, self.num_kv_heads, self.head_dim) or not all(
                t is None or (t.dtype in _WEIGHT_DTYPES and t.is_cpu and t.is_contiguous())
                for t in tensors) or any(m.kernel is None for m in linears):
            raise ValueError(f"the decoder layer kernel was compiled for (heads, kv heads, head_dim) "
                             f"{(self.num_heads, self.num_kv_heads, self.head_dim)} and takes contiguous float32 "
                             f"CPU weights, the linear ones packed; got {shapes}")
        hidden, intermediate = mlp.down_proj.out_features, mlp.down_proj.in_features
        weights = _LayerWeights(layer.input_layernorm.weight.data_ptr(), _Matrix.of(attn.qkv_proj),
                                _Matrix.of(attn.o_proj), layer.post_attention_layernorm.weight.data_ptr(),
                                _Matrix.of(mlp.gate_up_proj), _Matrix.of(mlp.down_proj), hidden, intermediate,
                                layer.input_layernorm.eps)
        return BoundLlamaLayer(self, weights, tensors, attn.attn.scale)


class BoundLlamaLayer:
    """One layer's `LlamaLayerKernel`, holding its weights' pointers (and the tensors, so that they stay alive)."""

    def __init__(self, kernel: LlamaLayerKernel, weights: _LayerWeights, tensors: list, scale: float):
        self.kernel, self.weights, self.tensors, self.scale = kernel, weights, tensors, scale

    def __call__(self, x: torch.Tensor, rotation: torch.Tensor, cache: torch.Tensor, meta) -> torch.Tensor:
        rotation = torch.view_as_real(rotation)
        self._check(x, rotation, cache, meta)
        kernel, (tokens, hidden) = self.kernel, x.shape
        slots, tables, starts, lens = meta.slot_mapping, meta.block_tables, meta.query_starts, meta.context_lens_tensor
        scratch = torch.empty(kernel._scratch(tokens, hidden, self.weights.intermediate))
        out = torch.empty_like(x)
        raise_for(kernel._run(ctypes.byref(self.weights), x.data_ptr(), out.data_ptr(), tokens, rotation.data_ptr(),
                               cache.data_ptr(), slots.data_ptr(), len(tables), starts.data_ptr(), tables.data_ptr(),
                               lens.data_ptr(), cache.shape[1], cache.shape[2], tables.shape[1], self.scale,
                               scratch.data_ptr(), torch.get_num_threads()))
        return out

    def _check(self, x, rotation, cache, meta) -> None:
        """The kernel trusts the layout it was compiled for (a mismatch reads or writes out of bounds): check it.
        Slots are checked by the kernel, query starts, block ids and lengths by the attention kernel it calls."""
        kernel = self.kernel
        tokens, seqs = len(x), len(meta.query_lens)
        slots, tables = meta.slot_mapping, meta.block_tables
        if x.dtype != torch.float32 or not x.is_cpu or x.shape != (tokens, self.weights.hidden) \
                or not x.is_contiguous() or rotation.shape != (tokens, 1, kernel.head_dim // 2, 2) \
                or not rotation.is_contiguous() \
                or not _is_cache(cache, kernel.num_kv_heads, kernel.head_dim, kernel.cache_dtype) \
                or len(meta.decode_context_lens) != seqs - meta.num_prefills or slots.shape != (tokens,) \
                or tables.dim() != 2 or len(tables) != seqs or len(meta.context_lens) != seqs \
                or (slots.dtype, tables.dtype) != (torch.int64,) * 2 \
                or not (slots.is_contiguous() and tables.is_contiguous()):
            raise ValueError(f"the decoder layer kernel takes metadata that agrees with itself and the batch, "
                             f"float32 on the CPU, {self.weights.hidden} wide, a contiguous cache of "
                             f"{kernel.num_kv_heads} KV heads of {kernel.head_dim}, and int64 slots and block tables; "
                             f"got x {tuple(x.shape)} {x.dtype}, cache {tuple(cache.shape)}, {seqs} sequences, "
                             f"{meta.num_prefills} prefills, {len(meta.decode_context_lens)} decode lengths")


@dataclass
class NativeKernels:
    paged_decode: PagedDecodeKernel
    rms_norm: RMSNormKernel
    silu_mul: SiluMulKernel
    linear: LinearKernel
    bf16linear: Bf16LinearKernel
    qlinear: QuantizedLinearKernel
    llama_layer: LlamaLayerKernel


def compile_kernels(num_heads: int, num_kv_heads: int, head_dim: int,
                    cache_dtype: torch.dtype = torch.float32) -> NativeKernels:
    """Compile the kernels for these head shapes and a KV cache of `cache_dtype` (float32 or bfloat16) into one
    library; RuntimeError when no compiler works."""
    if cache_dtype not in _CACHE_DTYPES:
        raise ValueError(f"the kernels' KV cache is float32 or bfloat16, not {cache_dtype}")
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("gcc")]
    if compiler[0] is None:
        raise RuntimeError("no C compiler (gcc) found")
    shapes = [f"-DHEAD_DIM={head_dim}", f"-DKV_HEADS={num_kv_heads}", f"-DGROUP={num_heads // num_kv_heads}",
              *_CACHE_DTYPES[cache_dtype]]
    with tempfile.TemporaryDirectory(prefix="nanoserve-kernels-") as folder:
        objects = [str(Path(folder) / f"{source.stem}.o") for source in _SOURCES]
        library = Path(folder) / "kernels.so"
        commands = [[*compiler, *_COMPILE, *shapes, str(source), "-o", obj] for source, obj in zip(_SOURCES, objects)]
        for command in commands + [[*compiler, *_LINK, *objects, "-o", str(library), "-lm"]]:
            _run_compiler(command)
        before = _openmp_runtimes()
        loaded = ctypes.CDLL(str(library))  # once loaded, the file may go
    if added := _openmp_runtimes() - before:
        raise RuntimeError(f"the kernels brought their own OpenMP runtime rather than torch's: {sorted(added)}")
    return NativeKernels(PagedDecodeKernel(loaded, num_heads, num_kv_heads, head_dim, cache_dtype),
                         RMSNormKernel(loaded), SiluMulKernel(loaded), LinearKernel(loaded), Bf16LinearKernel(loaded),
                         QuantizedLinearKernel(loaded),
                         LlamaLayerKernel(loaded, num_heads, num_kv_heads, head_dim, cache_dtype))


def _run_compiler(command: list[str]) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"{' '.join(command)} took over {error.timeout} s") from error
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")


def _openmp_runtimes() -> set[str]:
    """The OpenMP libraries mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return set(re.findall(r"\S*/lib(?:gomp|iomp5|omp)[-.\w]*\.so[.\d]*$", maps, re.MULTILINE))


def bfloat16_features() -> str:
    """What of AMX-BF16 and AVX-512 BF16 this CPU has (its flags in /proc/cpuinfo), for the bfloat16 linear kernel:
    "AMX", "AVX-512 BF16", or "" for neither (or no /proc/cpuinfo)."""
    try:
        flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE).group(1).split())
    except (OSError, AttributeError):
        return ""
    return "AMX" if {"amx_tile", "amx_bf16"} <= flags else "AVX-512 BF16" if "avx512_bf16" in flags else ""


def pick_kernels(backend: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 cache_dtype: torch.dtype = torch.float32) -> NativeKernels | None:
    """The native kernels the model should use, or None for the PyTorch path. `auto`: the native kernels on the
    CPU when they compile, for linear weights in float32 or bfloat16 (activations float32) and a KV cache in either;
    `native`: those or an error; `torch`: None."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    usable = device.type == "cpu" and dtype in _CACHE_DTYPES and cache_dtype in _CACHE_DTYPES
    if backend == "native" and not usable:
        raise ValueError(f"the native kernel backend runs on the CPU with float32 or bfloat16 weights and KV cache, "
                         f"not {dtype} weights and a {cache_dtype} cache on {device}")
    if backend in ("torch", "triton") or not usable:
        return None
    try:
        start = time.perf_counter()
        kernels = compile_kernels(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cache_dtype)
        log.info("attention, RMSNorm, SiLU, linear and decoder layers: native CPU kernels (compiled in %.1f s)",
                 time.perf_counter() - start)
        return kernels
    except (OSError, RuntimeError) as error:
        if backend == "native":
            raise
        log.warning("attention, RMSNorm, SiLU, linear and decoder layers run on the slower PyTorch path: %s", error)
        return None
