"""Engine configuration: one frozen dataclass whose fields the server's flags map to one to one."""
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # checkpoint folder, .gguf file, or None for the default model
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16: see `runner.resolve_dtype`
    device: str = "auto"  # auto | cpu | cuda
    kernel_backend: str = "auto"  # auto | torch | native (the compiled CPU kernels; see models/native.py)
    quantization: str = "auto"  # auto (a GGUF's quantized weights as they are) | none | int8 | int4: models/quant.py
    kv_cache_dtype: str = "auto"  # auto (bfloat16 where dtype resolves to it, else float32) | float32 | bfloat16
    load_format: str = "auto"  # auto (the checkpoint's weights) | dummy (random ones of its shape, for benchmarks)
    tensor_parallel_size: int = 1  # ranks that split the model (engine/parallel.py, models/parallel.py)
    enforce_eager: bool = False  # no CUDA graphs: every decode step launches its kernels one by one
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_memory_gib: float = 2.0  # KV cache size on the CPU
    gpu_memory_utilization: float = 0.9  # fraction of free GPU memory (after loading) for the KV cache
    num_kv_blocks: int | None = None  # overrides both sizes above
    max_model_len: int | None = None  # default: the model's context length
    max_num_seqs: int = 256
    # Tokens one step may compute. Default: 512 on the CPU, 8192 on a GPU with chunked prefill (see
    # `runner.CHUNKED_PREFILL_TOKENS`); max_model_len without it, so that a whole prompt runs in one step.
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True  # a long prompt is computed over several steps, beside running decodes
    enable_prefix_caching: bool = True  # full KV blocks are kept and reused by prompts that begin alike
    seed: int = 0  # for requests without a seed of their own
    max_logprobs: int = 20  # the most logprobs or prompt_logprobs a request may ask for (OpenAI's top_logprobs bound)

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be at least 0, got {self.max_logprobs}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
