"""Checkpoint to model: Hugging Face folders (safetensors, single or sharded) and GGUF files."""
import json
from collections.abc import Iterator
from pathlib import Path

import gguf
import torch
from safetensors import safe_open
from torch import nn

from models.attention import PagedAttention
from models.config import ModelConfig, config_from_gguf, config_from_hf
from models.gguf_file import open_gguf
from models.layers import GatedMLP, Linear, RMSNorm
from models.llama import LlamaDecoderLayer
from models.native import NativeKernels, pick_kernels
from models.registry import model_class

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


def _iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in _safetensors_files(folder):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _iter_gguf(reader: gguf.GGUFReader, model_cls, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    for t in reader.tensors:
        # GGUF lists dimensions innermost first; numpy's shape (and dequantize's result) is outermost first.
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        array = array.reshape(tuple(reversed([int(d) for d in t.shape])))
        if not array.flags.writeable:  # unquantized tensors come straight from the read-only memory map
            array = array.copy()
        yield model_cls.gguf_to_hf(t.name, torch.from_numpy(array), cfg)


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device,
               kernel_backend: str = "auto") -> nn.Module:
    """Build the model for the checkpoint at `path` on `device` in `dtype`, fill its weights, and give its
    attention, RMSNorm, MLP activation, linear and (Llama) decoder layers the native kernels that `kernel_backend`
    picks (see `models.native.pick_kernels`)."""
    path = Path(path)
    if path.suffix == ".gguf":
        reader = open_gguf(path)
        cfg = _gguf_config(reader)
        cls = model_class(cfg.architecture)
        weights = _iter_gguf(reader, cls, cfg)
    else:
        cfg = load_config(path)
        cls = model_class(cfg.architecture)
        weights = _iter_safetensors(path)
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to(dtype).to_empty(device=device)  # in `dtype` from the start: no float32 copy on the GPU
    model.load_weights(weights)
    kernels = pick_kernels(kernel_backend, cfg, dtype, device)
    if kernels is not None:
        _use_kernels(model, kernels)
    return model.eval().requires_grad_(False)


def _use_kernels(model: nn.Module, kernels: NativeKernels) -> None:
    """Hand the layers their native kernels, repacking each linear layer's weight in place for its kernel."""
    if model.lm_head is None:  # tied: the head gets a packed copy, the embedding keeps looking rows up
        with torch.device("meta"):
            model.lm_head = Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, PagedAttention):
            module.decode_kernel = kernels.paged_decode
        elif isinstance(module, RMSNorm):
            module.kernel = kernels.rms_norm
        elif isinstance(module, GatedMLP):
            module.act_kernel = kernels.silu_mul
        elif isinstance(module, Linear):
            module.weight = nn.Parameter(kernels.linear.pack(module.weight.detach()), requires_grad=False)
            module.kernel = kernels.linear
    for layer in model.model.layers:  # once their weights are packed
        if isinstance(layer, LlamaDecoderLayer):
            layer.decode_kernel = kernels.llama_layer.bind(layer)
