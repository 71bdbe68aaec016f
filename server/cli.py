"""`python -m server`: its flags (server/flags.py) to the engine and server configurations, then uvicorn, which
answers the probes at once (503 until the model is loaded) while the model loads in the background."""
import argparse
import logging
import os
import sys

import uvicorn

from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.worker import serve_if_torchrun_worker
from models.default_model import DEFAULT_MODEL
from server.app import build_app
from server.chat import choose_template
from server.config import ServerConfig
from server.flags import API_KEY_ENV, parse_args
from server.lifecycle import Lifecycle, Server
from server.metrics import Metrics
from server.serving import Served


def configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    engine = EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, kernel_backend=args.kernel_backend,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, load_format=args.load_format,
        enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size, block_size=args.block_size,
        kv_cache_memory_gib=args.kv_cache_memory_gib, gpu_memory_utilization=args.gpu_memory_utilization,
        num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_chunked_prefill=args.enable_chunked_prefill,
        enable_prefix_caching=args.enable_prefix_caching, seed=args.seed, max_logprobs=args.max_logprobs)
    keys = tuple(args.api_key) + tuple(k for k in os.environ.get(API_KEY_ENV, "").split(",") if k)
    server = ServerConfig(
        model_name=args.served_model_name or args.model or DEFAULT_MODEL, api_keys=keys,
        chat_template=args.chat_template, max_queued_requests=args.max_queued_requests, max_n=args.max_n,
        request_timeout=args.request_timeout, drain_timeout=args.drain_timeout,
        sse_ping_interval=args.sse_ping_interval, max_request_body_mib=args.max_request_body_mib,
        request_body_timeout=args.request_body_timeout, engine_stall_timeout=args.engine_stall_timeout,
        special_tokens_in_messages=args.allow_special_tokens_in_messages, allowed_origins=args.allowed_origins,
        allowed_methods=args.allowed_methods, allowed_headers=args.allowed_headers,
        allow_credentials=args.allow_credentials, tool_call_parser=args.tool_call_parser)
    return engine, server


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        engine_config, config = configs(args)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    serve_if_torchrun_worker(engine_config)
    metrics = Metrics()

    def load() -> Served:
        engine = LLMEngine(engine_config)
        engine.warm_up()
        templates = choose_template(config.chat_template, engine.tokenizer.chat_template,
                                    engine.model_config.architecture, engine.tokenizer.chat_templates)
        served = Served(AsyncLLMEngine(engine), config, templates, metrics)
        metrics.watch(engine, lambda: served.queued)
        return served

    lifecycle = Lifecycle(config, load)
    # The drain ends the requests in flight itself; what uvicorn waits for afterwards is idle connections.
    server = Server(uvicorn.Config(build_app(lifecycle, metrics), host=args.host, port=args.port,
                                   log_level="info", timeout_keep_alive=args.timeout_keep_alive,
                                   timeout_graceful_shutdown=5), lifecycle)
    server.run()
    code = lifecycle.exit_code if server.started else 1
    if lifecycle.loading:  # stopped while the model loads: leave its thread be, as an exiting interpreter cannot
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
