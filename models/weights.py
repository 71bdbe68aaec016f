"""Filling a model's parameters from checkpoint tensors named as in Hugging Face checkpoints."""
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from models.layers import regroup_rotary
from models.quant import BLOCK, GRID


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], fused: dict[str, tuple[str, int]],
                 rotary_heads: dict[str, int]) -> None:
    """Copy every tensor into its parameter; every parameter must be filled.

    `fused`: checkpoint projection name -> (fused module name, shard index), for projections kept in
    one matrix here. `rotary_heads`: projection name -> head count, for Q/K rows regrouped from halves
    into the pairs the rotary embedding works on.
    """
    params = dict(model.named_parameters())
    loaded = set()
    for name, tensor in weights:
        if "rotary_emb" in name:
            continue
        module_path, _, attr = name.rpartition(".")
        if module_path == "lm_head" and "lm_head.weight" not in params:
            continue  # some tied checkpoints store a copy of the embedding anyway
        module, _, proj = module_path.rpartition(".")
        if proj in rotary_heads:
            tensor = regroup_rotary(tensor, rotary_heads[proj], to_pairs=True)
        if proj in fused:
            target, shard = fused[proj]
            fused_module = model.get_submodule(f"{module}.{target}")
            if attr == GRID:
                _grid_of(fused_module)
            fused_module.load_shard(shard, attr, tensor)
        elif attr == GRID:
            _grid_of(model.get_submodule(module_path)).copy_(tensor)
        elif name in params:
            params[name].data.copy_(tensor)
        else:
            raise ValueError(f"unexpected tensor {name!r} in checkpoint")
        if attr != GRID:  # grids are optional: a quantized checkpoint's, beside its weights
            loaded.add(name)
    if missing := sorted(set(_checkpoint_names(params, fused)) - loaded):
        raise ValueError(f"checkpoint lacks tensors: {missing[:5]}")


def _grid_of(module: nn.Module) -> torch.Tensor:
    """The module's block grid (see `models.quant`), made on its first shard: NaN for rows no shard fills."""
    if getattr(module, GRID, None) is None:
        rows, inputs = module.weight.shape
        setattr(module, GRID, torch.full((rows, inputs // BLOCK, 2), float("nan")))
    return getattr(module, GRID)


def _checkpoint_names(params: dict[str, nn.Parameter], fused: dict[str, tuple[str, int]]) -> Iterator[str]:
    """The checkpoint tensors that fill `params`: a fused parameter takes one from each projection it holds."""
    projections: dict[str, list[str]] = {}
    for proj, (target, _) in fused.items():
        projections.setdefault(target, []).append(proj)
    for name in params:
        module_path, _, attr = name.rpartition(".")
        module, _, child = module_path.rpartition(".")
        yield from ([f"{module}.{proj}.{attr}" for proj in projections[child]] if child in projections else [name])
