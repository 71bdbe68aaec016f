"""The choices of the model layer's options, in a module that imports nothing: the server's flags offer them, and
the Docker health check parses those flags every 30 s without loading torch."""
KERNEL_BACKENDS = ("auto", "torch", "native", "triton")  # see models/native.py, models/triton_attention.py
QUANTIZATIONS = ("auto", "none", "int8", "int4")  # see models/quant.py
DTYPES = ("auto", "float32", "bfloat16", "float16")  # see engine/runner.py
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")
LOAD_FORMATS = ("auto", "dummy")  # dummy: random weights, no checkpoint files read (benchmarks), as vLLM names it
