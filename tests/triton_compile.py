"""Compile the Triton paged-attention kernel for an NVIDIA GPU of the given compute capability (80, 90, ...) without
one, as `TritonPagedAttention` launches it: decode tiles and prompt tiles, bfloat16 and float32. Prints each variant
compiled; fails on the first that does not. Run by `tests/test_triton_attention.py` in a process without
TRITON_INTERPRET."""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from models.triton_attention import TILE, TritonPagedAttention, _paged_attention


def main(capability: int) -> None:
    kernel = TritonPagedAttention(32, 8, 128)  # Llama-2-70B's heads: GQA 4
    for dtype, tile in (("bf16", 1), ("bf16", TILE), ("fp32", TILE)):
        signature = {name: f"*{dtype}" for name in ("q", "keys", "values", "out")}
        signature |= {name: "*i64" for name in ("block_tables", "query_starts", "context_lens")}
        signature |= {"scale": "fp32", "num_seqs": "i32", "table_width": "i32", "block_size": "i32"}
        constants = kernel.constants(tile, exact=dtype == "fp32")
        source = ASTSource(fn=_paged_attention, signature=signature | {name: "constexpr" for name in constants},
                           constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
        assert "cubin" in compiled.asm and ".entry _paged_attention" in compiled.asm["ptx"]
        print(f"{dtype}/{tile}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
