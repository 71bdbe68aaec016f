"""Quantized linear weights: blocks of 32 inputs per output, each block unsigned integers u (8 or 4 bits) with a float
scale d and offset m, w = d * u + m (the form `kernels/qlinear.c` computes with).

A GGUF's quantized tensors reach the model dequantized, with their grid beside them: each block's (d, m), as a
tensor [rows, inputs / 32, 2] named `<weight>_grid` that follows the weight through renaming, row reordering and
fusing. Packing recovers u = (w - m) / d exactly, so Q8_0, Q4_0, Q4_1, Q4_K, Q5_0 and Q5_1 weights run on the
file's own integers. Other quantized types come with a grid of NaNs, and are quantized afresh to 8 bits (from a
finer grid: nearly lossless); so are float weights with `--quantization int8`."""
import numpy as np
import torch
from gguf import GGMLQuantizationType as GGML

GRID = "weight_grid"
BLOCK = 32
_GRID_TYPES = {GGML.Q8_0, GGML.Q4_0, GGML.Q4_1, GGML.Q5_0, GGML.Q5_1, GGML.Q4_K}


def gguf_grid(raw: np.ndarray, qtype: GGML, rows: int, inputs: int) -> torch.Tensor | None:
    """The (d, m) of each block of 32 inputs of a GGUF tensor's raw blocks, [rows, inputs / 32, 2] float32; NaNs
    for a quantized type whose blocks have no such grid; None for float tensors."""
    if qtype in (GGML.F32, GGML.F16, GGML.BF16):
        return None
    if qtype not in _GRID_TYPES or inputs % BLOCK:
        return torch.full((rows, inputs // BLOCK, 2), float("nan"))
    blocks = np.ascontiguousarray(raw).reshape(rows * inputs // (256 if qtype == GGML.Q4_K else BLOCK), -1)
    half = blocks[:, :4].view(np.float16).astype(np.float32)  # every type here starts with an fp16 d (and m)
    d = half[:, :1]
    if qtype == GGML.Q4_K:
        return torch.from_numpy(_q4_k_grid(blocks, d, half[:, 1:2]).reshape(rows, inputs // BLOCK, 2))
    offset = {GGML.Q8_0: -128 * d, GGML.Q4_0: -8 * d, GGML.Q5_0: -16 * d}.get(qtype, half[:, 1:2])
    return torch.from_numpy(np.concatenate([d, offset], axis=1).reshape(rows, inputs // BLOCK, 2))


def _q4_k_grid(blocks: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """Q4_K: 256 inputs a block, in 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes:
    w = d * scale * q - dmin * min."""
    packed = blocks[:, 4:16].astype(np.uint8)
    scales, mins = np.empty((len(blocks), 8), np.uint8), np.empty((len(blocks), 8), np.uint8)
    scales[:, :4], mins[:, :4] = packed[:, 0:4] & 63, packed[:, 4:8] & 63
    scales[:, 4:] = (packed[:, 8:12] & 15) | ((packed[:, 0:4] >> 6) << 4)
    mins[:, 4:] = (packed[:, 8:12] >> 4) | ((packed[:, 4:8] >> 6) << 4)
    return np.stack([d * scales, -(dmin * mins)], axis=-1)


def quantize(weight: torch.Tensor, grid: torch.Tensor | None, bits: int | None) -> tuple[torch.Tensor, ...]:
    """weight [n, k] float -> (u [n, k] uint8, d [n, k / 32], m [n, k / 32], bits). Blocks on a grid keep it
    when their integers fit `bits` (None: 4 when every block's fit in 4, else 8); the others are quantized
    afresh: 8 bits symmetric (d = max |w| / 127, as Q8_0), 4 bits between the block's min and max (as Q4_1)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // BLOCK, BLOCK)
    if grid is None:
        grid = torch.full((n, k // BLOCK, 2), float("nan"))
    d, m = grid[..., 0].clone(), grid[..., 1].clone()
    fresh = d.isnan()
    u = torch.where(d[..., None] == 0, 0, torch.round((w - m[..., None]) / d[..., None])).nan_to_num(255)
    bits = bits or (4 if not fresh.any() and u.max() <= 15 else 8)
    fresh |= (u.amax(-1) >= 1 << bits) | (u.amin(-1) < 0)
    if fresh.any():
        d[fresh], m[fresh], u[fresh] = _fresh(w[fresh], bits)
    return u.to(torch.uint8).reshape(n, k), d, m, bits


def _fresh(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if bits == 8:
        d = w.abs().amax(-1) / 127
        m = -128 * d
    else:
        low, high = w.amin(-1), w.amax(-1)
        d, m = (high - low) / 15, low
    u = torch.where(d[:, None] == 0, 0, torch.round((w - m[:, None]) / d[:, None]))
    return d, m, u.clamp(0, (1 << bits) - 1)


def dequantize(u: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n, k = u.shape
    return (d[..., None] * u.reshape(n, -1, BLOCK).float() + m[..., None]).reshape(n, k)


def pack(u: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> torch.Tensor:
    """-> [ceil(n / 16), k / 32, block bytes] uint8, `qlinear.c`'s panels: per panel of 16 outputs and block of 32
    inputs, their 16 scales and 16 offsets (float32), then the integers 4 inputs of the 16 outputs at a time
    (4-bit: inputs 4g .. 4g + 3 in the low nibbles of group g, 16 + 4g .. in the high ones)."""
    n, k = u.shape
    panels, blocks = -(-n // 16), k // BLOCK
    u = torch.cat([u, u.new_zeros(panels * 16 - n, k)]).view(panels, 16, blocks, BLOCK).transpose(1, 2)
    scales = [torch.cat([t, t.new_zeros(panels * 16 - n, blocks)]).view(panels, 16, blocks).transpose(1, 2)
              for t in (d.float(), m.float())]
    if bits == 4:
        u = u[..., :16] | (u[..., 16:] << 4)
    groups = u.reshape(panels, blocks, 16, -1, 4).transpose(2, 3).reshape(panels, blocks, -1)
    header = torch.cat(scales, dim=-1).contiguous().view(torch.uint8)
    return torch.cat([header, groups], dim=-1).contiguous()
