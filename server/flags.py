"""The flags of `python -m server` (vLLM's names where vLLM has them), parsed without importing the engine: the
Docker health check (server/healthcheck.py) reads the port from them every few seconds."""
import argparse
import json

from models.default_model import DEFAULT_MODEL
from models.options import DTYPES, KERNEL_BACKENDS, KV_CACHE_DTYPES, LOAD_FORMATS, QUANTIZATIONS
from server.config import ServerConfig
from server.tool_parsers import PARSERS

API_KEY_ENV = "NANOSERVE_API_KEY"  # one key, or several separated by commas


def json_list(text: str) -> tuple[str, ...]:
    """A flag's JSON list of strings, as vLLM's CORS flags take them: '["https://app.example"]'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise argparse.ArgumentTypeError(f"not a JSON list of strings, such as '[\"*\"]': {text!r}")
    return tuple(value)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server", description="OpenAI-compatible LLM server")
    p.add_argument("--model", default=None, help=f"checkpoint folder or .gguf file (default: {DEFAULT_MODEL})")
    p.add_argument("--served-model-name", default=None, help="the name clients use (default: --model)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[], help=f"repeatable; also ${API_KEY_ENV}")
    p.add_argument("--chat-template", default=None, help="a file, or a built-in name (chatml, llama-2-chat, ...)")
    p.add_argument("--tool-call-parser", choices=sorted(PARSERS), default=None,
                   help="the format of the model's tool calls (default: picked from the chat template; Hermes' "
                        "<tool_call> for a template that knows no tools)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens one engine step may compute (default with chunked prefill: 512 on the CPU, which keeps "
                        "a step short, and 8192 on a GPU; without it: the model length, a whole prompt in one step)")
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="compute a long prompt over several steps, beside the running streams' tokens")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="keep full KV blocks and reuse them for prompts that begin alike")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="the precision of the linear layers' float weights. auto: on the CPU bfloat16 where it "
                        "multiplies them natively (AMX or AVX-512 BF16; activations stay float32), float32 elsewhere; "
                        "on a GPU the checkpoint's dtype")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="the KV cache's precision (auto: bfloat16 where --dtype is bfloat16, else float32): bfloat16 "
                        "holds twice the tokens and halves what attention reads")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--kernel-backend", default="auto", choices=KERNEL_BACKENDS,
                   help="native: decode attention, RMSNorm, linear and Llama decoder layers in C kernels compiled at "
                        "start (on the CPU, float32 activations; auto uses them there when gcc is found); triton: "
                        "paged attention in Triton, the rest in PyTorch (auto uses it on CUDA where Triton is "
                        "installed); torch: PyTorch operations only")
    p.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                   help="linear weights in blocks of 32 integers with a scale and offset, run with int8 activations "
                        "in the native kernels: auto keeps a GGUF's quantized weights so (Q8_0, Q4_0, Q4_1, Q4_K as "
                        "they are; other types in 8 bits), none runs float32, int8 and int4 quantize every linear "
                        "weight at load")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over this many ranks (GPUs, or processes on the CPU), Megatron-style; each "
                        "holds 1/N of the weights and of the KV cache")
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="dummy: random weights of the checkpoint's shape, none read from its files (benchmarks)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: launch each decode step's kernels one by one (graphs are recorded at start "
                        "for decode batches of up to --max-num-seqs sequences)")
    p.add_argument("--kv-cache-memory-gib", type=float, default=2.0, help="KV cache size on the CPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of the GPU memory free after loading that the KV cache takes")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache size in blocks (overrides both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="the most log-probabilities a request may ask for per token (logprobs, top_logprobs, "
                        "prompt_logprobs)")
    defaults = ServerConfig(model_name="")
    p.add_argument("--max-queued-requests", type=int, default=defaults.max_queued_requests,
                   help="sequences (prompts times n) waiting to start beyond which new requests get 429")
    p.add_argument("--max-n", type=int, default=defaults.max_n, help="the most choices (n) one request may ask for")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may wait and run before it is aborted (default: no limit)")
    p.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout,
                   help="seconds requests in flight get to finish after SIGTERM")
    p.add_argument("--sse-ping-interval", type=float, default=defaults.sse_ping_interval,
                   help="seconds of silence on a stream before a `: ping` comment")
    p.add_argument("--max-request-body-mib", type=float, default=defaults.max_request_body_mib)
    p.add_argument("--request-body-timeout", type=float, default=defaults.request_body_timeout,
                   help="seconds a request's body may take to arrive in full before the request gets 408")
    p.add_argument("--engine-stall-timeout", type=float, default=defaults.engine_stall_timeout,
                   help="seconds one engine step may run; past it the engine counts as hung, /health says 503 and the "
                        "process exits 1 (raise it with --max-num-batched-tokens or without chunked prefill)")
    p.add_argument("--allow-special-tokens-in-messages", action="store_true",
                   help="parse special tokens (<|im_start|>, ...) written in chat message text as control tokens; by "
                        "default such text is plain text, so that a user cannot write turns of other roles")
    p.add_argument("--allowed-origins", type=json_list, default=defaults.allowed_origins,
                   help='CORS: the origins allowed to call the API from a browser, a JSON list (default: ["*"])')
    p.add_argument("--allowed-methods", type=json_list, default=defaults.allowed_methods,
                   help='CORS: the methods allowed, a JSON list (default: ["*"])')
    p.add_argument("--allowed-headers", type=json_list, default=defaults.allowed_headers,
                   help='CORS: the request headers allowed, a JSON list (default: ["*"])')
    p.add_argument("--allow-credentials", action="store_true", help="CORS: let browsers send credentials (cookies)")
    p.add_argument("--timeout-keep-alive", type=int, default=5,
                   help="seconds an idle connection stays open; behind a load balancer, longer than its idle timeout")
    return p.parse_args(argv)
