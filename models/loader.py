"""Checkpoint to model: Hugging Face folders (safetensors, single or sharded) and GGUF files."""
import dataclasses
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import gguf
import torch
from safetensors import safe_open
from torch import nn

from models import quant
from models.attention import PagedAttention
from models.config import ModelConfig, config_from_gguf, config_from_hf
from models.gguf_file import open_gguf
from models.layers import GatedMLP, Linear, RMSNorm
from models.llama import LlamaDecoderLayer
from models.native import NativeKernels, pick_kernels
from models.options import LOAD_FORMATS, QUANTIZATIONS
from models.parallel import TensorParallel, check_split, checkpoint_slice, local_heads, take_slice
from models.registry import model_class

log = logging.getLogger(__name__)
_GGUF_FILE_DTYPES = {gguf.LlamaFileType.MOSTLY_F16: torch.float16, gguf.LlamaFileType.MOSTLY_BF16: torch.bfloat16}


def read_gguf_metadata(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if path.suffix == ".gguf":
        return _gguf_config(open_gguf(path))
    return config_from_hf(json.loads((path / "config.json").read_text()))


def _gguf_config(reader: gguf.GGUFReader) -> ModelConfig:
    meta = read_gguf_metadata(reader)
    # Quantized tensors dequantize to float32; a file of float16 or bfloat16 weights keeps that dtype.
    dtype = _GGUF_FILE_DTYPES.get(meta.get("general.file_type"), torch.float32)
    return config_from_gguf(meta, {t.name for t in reader.tensors}, dtype)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    return files


def _iter_safetensors(folder: Path, cfg: ModelConfig, tp: TensorParallel) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor, or the rank's slice of it, read alone from the file."""
    for file in _safetensors_files(folder):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                how = checkpoint_slice(name, cfg, tp)
                if not isinstance(how, tuple):
                    yield name, take_slice(f.get_tensor(name), how, tp.rank)
                    continue
                dim, start, stop = how
                view = f.get_slice(name)
                shape = view.get_shape()
                index = tuple(slice(start, min(stop, shape[d])) if d == dim else slice(None) for d in range(len(shape)))
                yield name, take_slice(view[index], (dim, 0, stop - start), tp.rank)  # pads a short vocabulary


def _iter_gguf(reader: gguf.GGUFReader, model_cls, cfg: ModelConfig, grids: bool,
               tp: TensorParallel) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor dequantized to float32, and with `grids` each quantized one's block grid (see `models.quant`); of a
    tensor that ranks split by rows, only this rank's rows are dequantized (its raw rows, read alone from the file)."""
    heads, kv_heads = local_heads(cfg, tp)
    local = dataclasses.replace(cfg, num_heads=heads, num_kv_heads=kv_heads)  # Q/K rows regroup head by head
    for t in reader.tensors:
        # GGUF lists dimensions innermost first; numpy's shape (and dequantize's result) is outermost first.
        shape = tuple(reversed([int(d) for d in t.shape]))
        name = model_cls.gguf_name(t.name)
        how, raw = checkpoint_slice(name, cfg, tp), t.data
        if isinstance(how, tuple) and how[0] == 0:  # rows: slice the raw blocks; pad a short vocabulary afterwards
            _, start, stop = how
            raw, how = raw[start:min(stop, shape[0])], (0, 0, stop - start)
            shape = (len(raw), *shape[1:])
        array = gguf.quants.dequantize(raw, t.tensor_type).reshape(shape)
        if not array.flags.writeable:  # unquantized tensors come straight from the read-only memory map
            array = array.copy()
        yield name, take_slice(model_cls.gguf_to_hf(t.name, torch.from_numpy(array), local)[1], how, tp.rank)
        grid = quant.gguf_grid(raw, t.tensor_type, math.prod(shape[:-1]), shape[-1]) if grids else None
        grid_how = checkpoint_slice(f"{name}_grid", cfg, tp) if isinstance(how, tuple) and how[0] == 1 else how
        if grid is not None and grid_how != "drop":
            grid = model_cls.gguf_to_hf(t.name, grid.reshape(*shape[:-1], -1, 2), local)[1]
            yield f"{name}_grid", take_slice(grid, grid_how, tp.rank)  # "<...>.weight_grid": quant.GRID


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device, kernel_backend: str = "auto",
               quantization: str = "auto", kv_cache_dtype: torch.dtype = torch.float32,
               load_format: str = "auto", tp: TensorParallel = TensorParallel()) -> nn.Module:
    """Build the model for the checkpoint at `path` on `device`, fill its weights, and give its attention, RMSNorm,
    MLP activation, linear and (Llama) decoder layers the native kernels that `kernel_backend` picks (see
    `models.native.pick_kernels`), compiled for a KV cache of `kv_cache_dtype`, with the linear weights
    `quantization` asks for: `auto` runs a GGUF's quantized weights in their blocks, `none` in `dtype`, `int8` and
    `int4` every linear weight in blocks of that many bits (see `models.quant`). With the native kernels the
    activations are float32 and `dtype` (float32 or bfloat16) is that of the float linear weights; without them the
    whole model is in `dtype`. Quantized weights need the native kernels. `load_format` `dummy` fills the weights
    randomly and reads none from the checkpoint (its config alone): for benchmarks of a model's shape. With `tp` of
    several ranks, the model holds this rank's share of each layer (`models.parallel`) and reads only that."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    path = Path(path)
    kernels_usable = kernel_backend in ("auto", "native") and device.type == "cpu" \
        and dtype in (torch.float32, torch.bfloat16)
    if quantization in ("int8", "int4") and not kernels_usable:
        raise ValueError(f"--quantization {quantization} runs in the native kernels: on the CPU with float32 or "
                         f"bfloat16, not {dtype} on {device} with the {kernel_backend} kernel backend")
    if path.suffix == ".gguf":
        reader = open_gguf(path)
        cfg = _gguf_config(reader)
        cls = model_class(cfg.architecture)
        weights = _iter_gguf(reader, cls, cfg, kernels_usable and quantization != "none", tp)
    else:
        cfg = load_config(path)
        cls = model_class(cfg.architecture)
        weights = _iter_safetensors(path, cfg, tp)
    check_split(cfg, tp.size)
    heads, kv_heads = local_heads(cfg, tp)
    local = dataclasses.replace(cfg, num_heads=heads, num_kv_heads=kv_heads)  # what this rank's kernels see
    kernels = pick_kernels(kernel_backend, local, dtype, device, kv_cache_dtype)
    if kernels is None and quantization in ("int8", "int4"):
        raise ValueError(f"--quantization {quantization} needs the native kernels, which did not compile")
    with torch.device("meta"):
        model = cls(cfg, tp)
    # In its dtype from the start (no float32 copy on the GPU); float32 for the kernels, which pack the weights.
    model = model.to(dtype if kernels is None else torch.float32).to_empty(device=device)
    if load_format == "dummy":
        _fill_randomly(model)
    else:
        model.load_weights(weights)
    model.rotary.inv_freq = model.rotary.inv_freq.to(device)  # once: a copy from the host each step stalls a GPU
    if kernels is not None:
        _use_kernels(model, kernels, quantization, dtype)
    elif (attention := _triton_attention(kernel_backend, local, device)) is not None:
        for module in model.modules():
            if isinstance(module, PagedAttention):
                module.decode_kernel = attention
    _drop_grids(model)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _fill_randomly(model: nn.Module) -> None:
    """Weights uniform in ±1e-3 (vLLM's dummy range: activations stay small through any depth), norms' weights 1
    and their biases 0, from a fixed seed on the model's device."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            param.uniform_(-1e-3, 1e-3, generator=generator)


def _triton_attention(backend: str, cfg: ModelConfig, device: torch.device):
    """Triton's paged attention (`models.triton_attention`) for the `triton` backend, and for `auto` on CUDA where
    Triton is installed; None for the PyTorch path. On the CPU it runs only under Triton's interpreter (tests)."""
    if not (backend == "triton" or (backend == "auto" and device.type == "cuda")):
        return None
    try:
        from models.triton_attention import TritonPagedAttention
    except ImportError as error:
        if backend == "triton":
            raise ValueError(f"--kernel-backend triton needs Triton: {error}") from error
        log.warning("attention runs on the PyTorch path: Triton is not installed (%s)", error)
        return None
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--kernel-backend triton runs on CUDA (or on the CPU under TRITON_INTERPRET=1, for tests)")
    log.warning("attention: Triton paged kernel on %s", device)
    return TritonPagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)


def _use_kernels(model: nn.Module, kernels: NativeKernels, quantization: str = "none",
                 dtype: torch.dtype = torch.float32) -> None:
    """Hand the layers their native kernels, packing each linear layer's weight in place for its kernel: quantized
    as `quantization` asks, the others in `dtype`."""
    if model.lm_head is None:  # tied: the head gets a packed copy, the embedding keeps looking rows up
        with torch.device("meta"):
            model.lm_head = Linear(*reversed(model.model.embed_tokens.weight.shape), bias=False)
        model.lm_head.weight = model.model.embed_tokens.weight
        setattr(model.lm_head, quant.GRID, getattr(model.model.embed_tokens, quant.GRID, None))
    linears: Counter = Counter()
    for module in model.modules():
        if isinstance(module, PagedAttention):
            module.decode_kernel = kernels.paged_decode
        elif isinstance(module, RMSNorm):
            module.kernel = kernels.rms_norm
        elif isinstance(module, GatedMLP):
            module.act_kernel = kernels.silu_mul
        elif isinstance(module, Linear):
            linears[_pack_linear(module, kernels, quantization, dtype, head=module is model.lm_head)] += 1
    log.warning("linear layers: %s", ", ".join(f"{count} in {bits}" for bits, count in sorted(linears.items())))
    for layer in model.model.layers:  # once their weights are packed; a layer split over ranks sums between its halves
        if isinstance(layer, LlamaDecoderLayer) and layer.tp.size == 1:
            layer.decode_kernel = kernels.llama_layer.bind(layer)


def _pack_linear(linear: Linear, kernels: NativeKernels, quantization: str, dtype: torch.dtype, head: bool) -> str:
    """Pack the layer's weight for the quantized kernel, or the float32 or bfloat16 one; returns which it got. `int4`
    keeps the output head in 8 bits, as llama.cpp's 4-bit files do: in 4 bits the top token changes at ~1 position
    in 5."""
    weight, grid = linear.weight.detach(), getattr(linear, quant.GRID, None)
    bits = {"int8": 8, "int4": 8 if head else 4}.get(quantization)
    if quantization == "none" or linear.in_features % quant.BLOCK or (grid is None and bits is None):
        kernel = kernels.bf16linear if dtype == torch.bfloat16 else kernels.linear
        linear.weight = nn.Parameter(kernel.pack(weight), requires_grad=False)
        linear.kernel = kernel
        return f"bfloat16 ({kernel.path})" if dtype == torch.bfloat16 else "float32"
    u, d, m, bits = quant.quantize(weight, grid, bits)
    linear.weight = nn.Parameter(quant.pack(u, d, m, bits), requires_grad=False)
    linear.kernel = kernels.qlinear
    return f"{bits}-bit blocks ({kernels.qlinear.path})"


def _drop_grids(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, quant.GRID):
            delattr(module, quant.GRID)
