"""How far a quantized or bfloat16 path is from float32: top-1 agreement of the logits and perplexity, over a fixed
text.

    python -m models.quality [--model PATH.gguf] [--modes auto int8 int4 bfloat16 kv-bfloat16] [--text FILE]

The model reads the whole text in one forward pass per mode; each position's logits are compared with the float32
path's (`--quantization none --dtype float32 --kv-cache-dtype float32`): how often their argmax agrees, and the
perplexity of the text's next tokens."""
import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from models.attention import AttentionMetadata
from models.default_model import resolve_model
from models.loader import load_model
from models.tokenizer import load_tokenizer

TEXT = Path(__file__).parent / "data" / "quality.txt"  # 1,243 tokens of English prose for SmolLM2's tokenizer
BLOCK_SIZE = 16


@dataclass(frozen=True)
class Mode:
    """A path to measure: the server's flags (--quantization, --dtype, --kv-cache-dtype) it stands for."""
    quantization: str
    dtype: torch.dtype = torch.float32
    kv_cache_dtype: torch.dtype = torch.float32

    @property
    def flags(self) -> str:
        name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
        return f"--quantization {self.quantization} --dtype {name(self.dtype)} " \
               f"--kv-cache-dtype {name(self.kv_cache_dtype)}"


FLOAT32 = Mode("none")
MODES = {"auto": Mode("auto"), "int8": Mode("int8"), "int4": Mode("int4"), "bfloat16": Mode("none", torch.bfloat16),
         "kv-bfloat16": Mode("none", kv_cache_dtype=torch.bfloat16),
         "auto+kv-bfloat16": Mode("auto", kv_cache_dtype=torch.bfloat16)}


@dataclass(frozen=True)
class Quality:
    agreement: float  # the fraction of positions whose argmax is float32's
    perplexity: float
    float32_perplexity: float

    @property
    def perplexity_change(self) -> float:
        return self.perplexity / self.float32_perplexity - 1


def logits(model, ids: list[int], cache_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The logits of every position of `ids`, read as one prompt: [len(ids), vocab]."""
    cfg, blocks = model.config, -(-len(ids) // BLOCK_SIZE)
    caches = [torch.zeros(2, blocks, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim, dtype=cache_dtype)
              for _ in range(cfg.num_layers)]
    positions = torch.arange(len(ids))
    meta = AttentionMetadata(query_lens=[len(ids)], context_lens=[len(ids)], num_prefills=1, slot_mapping=positions,
                             block_tables=torch.arange(blocks)[None], decode_context_lens=torch.tensor([]))
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), positions, caches, meta))


def perplexity(scores: torch.Tensor, ids: list[int]) -> float:
    return math.exp(F.cross_entropy(scores[:-1].double(), torch.tensor(ids[1:])).item())


def compare(reference: torch.Tensor, scores: torch.Tensor, ids: list[int]) -> Quality:
    agreement = (scores.argmax(-1) == reference.argmax(-1)).double().mean().item()
    return Quality(agreement, perplexity(scores, ids), perplexity(reference, ids))


def mode_logits(path: str | Path, mode: Mode, ids: list[int]) -> torch.Tensor:
    model = load_model(path, mode.dtype, torch.device("cpu"), quantization=mode.quantization,
                       kv_cache_dtype=mode.kv_cache_dtype)
    return logits(model, ids, mode.kv_cache_dtype)


def evaluate(path: str | Path, modes: list[str], ids: list[int]) -> dict[str, Quality]:
    reference = mode_logits(path, FLOAT32, ids)
    return {name: compare(reference, mode_logits(path, MODES[name], ids), ids) for name in modes}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file or checkpoint folder (default: the default model)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--text", type=Path, default=TEXT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    path = resolve_model(args.model)
    ids = load_tokenizer(path).encode(args.text.read_text())
    results = evaluate(path, args.modes, ids)
    print(f"{Path(path).name}, {len(ids)} tokens of {args.text.name}, against float32 ({FLOAT32.flags})")
    print(f"{'mode':<18}{'top-1 agreement':>16}{'perplexity':>24}   flags")
    for name, quality in results.items():
        print(f"{name:<18}{quality.agreement:>15.1%} {quality.float32_perplexity:>10.3f} -> {quality.perplexity:.3f} "
              f"({quality.perplexity_change:+.2%})   {MODES[name].flags}")


if __name__ == "__main__":
    main()
