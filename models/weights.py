"""Filling a model's parameters from checkpoint tensors named as in Hugging Face checkpoints."""
from collections.abc import Iterable

import torch
from torch import nn

from models.layers import regroup_rotary


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], fused: dict[str, tuple[str, int]],
                 rotary_heads: dict[str, int]) -> None:
    """Copy every tensor into its parameter; every parameter must be filled.

    `fused`: checkpoint projection name -> (fused module name, shard index), for projections kept in
    one matrix here. `rotary_heads`: projection name -> head count, for Q/K rows regrouped from halves
    into the pairs the rotary embedding works on.
    """
    params = dict(model.named_parameters())
    missing = set(params)
    for name, tensor in weights:
        if "rotary_emb" in name:
            continue
        if name == "lm_head.weight" and name not in params:
            continue  # some tied checkpoints store a copy of the embedding anyway
        module_path, _, attr = name.rpartition(".")
        module, _, proj = module_path.rpartition(".")
        if proj in rotary_heads:
            tensor = regroup_rotary(tensor, rotary_heads[proj], to_pairs=True)
        if proj in fused:
            target, shard = fused[proj]
            model.get_submodule(f"{module}.{target}").load_shard(shard, attr, tensor)
            missing.discard(f"{module}.{target}.{attr}")
            continue
        if name not in params:
            raise ValueError(f"unexpected tensor {name!r} in checkpoint")
        params[name].data.copy_(tensor)
        missing.discard(name)
    if missing:
        raise ValueError(f"checkpoint lacks tensors: {sorted(missing)[:5]}")
