"""The native linear kernels side by side: float32, bfloat16 and quantized weights, at a model's shapes.

    python -m models.bench_linear [--model PATH] [--rows 1 16 64 512] [--repeats 7]

For each of the model's projection shapes (its first layer's, and the output head) and each number of rows, the
median time of each kernel over random inputs and its multiply-adds a second (2 * rows * outputs * inputs), the
kernels taking turns so that a busy machine slows them alike, and each one's speed against float32's."""
import argparse
import statistics
import time

import torch

from models import quant
from models.default_model import resolve_model
from models.loader import load_config
from models.native import compile_kernels


def seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.bench_linear", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file or checkpoint folder (default: the default model)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 512])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    cfg = load_config(resolve_model(args.model))
    kernels = compile_kernels(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    shapes = {"qkv": (qkv, cfg.hidden_size), "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size),
              "down": (cfg.hidden_size, cfg.intermediate_size), "head": (cfg.vocab_size, cfg.hidden_size)}
    print(f"{torch.get_num_threads()} threads; bfloat16: {kernels.bf16linear.path}, quantized: {kernels.qlinear.path}")
    print(f"{'shape':<22}{'rows':>6}" + "".join(f"{name:>22}" for name in ("float32", "bfloat16", "int8", "int4")))
    for name, (outputs, inputs) in shapes.items():
        weight = torch.randn(outputs, inputs)
        packed = {"float32": (kernels.linear, kernels.linear.pack(weight)),
                  "bfloat16": (kernels.bf16linear, kernels.bf16linear.pack(weight)),
                  **{f"int{b}": (kernels.qlinear, quant.pack(*quant.quantize(weight, None, b))) for b in (8, 4)}}
        for rows in args.rows:
            x = torch.randn(rows, inputs)
            runs = {kind: [] for kind in packed}
            for repeat in range(args.repeats + 1):  # in turns; the first round warms up
                for kind, (kernel, weights) in packed.items():
                    elapsed = seconds(lambda: kernel(x, weights, None, outputs))
                    runs[kind] += [elapsed] if repeat else []
            times = {kind: statistics.median(r) for kind, r in runs.items()}
            cells = [f"{2 * rows * outputs * inputs / t / 1e9:7.0f} GF/s {times['float32'] / t:5.2f}x"
                     for t in times.values()]
            print(f"{f'{name} {outputs}x{inputs}':<22}{rows:>6}" + "".join(f"{cell:>22}" for cell in cells),
                  flush=True)


if __name__ == "__main__":
    main()
