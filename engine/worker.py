"""A tensor-parallel worker: rank r of N, holding its share of the model and of the KV cache, doing each step that
rank 0 broadcasts until it says stop (see `engine/parallel.py`).

    main(["", RANK, JOB])     as rank 0 starts it (JOB: the engine config, model path and address, in JSON)

Under torchrun every rank runs the server's or the offline API's command; ranks above 0 turn into workers
(`run_worker`)."""
import json
import logging
import os
import sys
import threading
import time

from engine.config import EngineConfig
from engine.parallel import device_for_rank, join, receive, torchrun_rank
from engine.runner import ModelRunner, resolve_device
from models.default_model import resolve_model
from models.loader import load_config


def run_worker(config: EngineConfig, model_path, rank: int, address: str, max_model_len: int | None = None) -> None:
    device = device_for_rank(resolve_device(config.device), rank)
    orders = join(rank, config.tensor_parallel_size, address, device)
    checkpoint = load_config(model_path)
    runner = ModelRunner(config, model_path, checkpoint,
                         max_model_len or config.max_model_len or checkpoint.max_position_embeddings, rank=rank)
    while (order := receive(orders))[0] != "stop":
        runner.handle(*order)


def serve_if_torchrun_worker(config: EngineConfig) -> None:
    """Under torchrun, where every rank runs the same command, ranks above 0 serve rank 0's steps, then exit."""
    if torchrun_rank() > 0:
        run_worker(config, resolve_model(config.model), torchrun_rank(), "env://")
        sys.exit(0)


def _exit_with_parent() -> None:
    """End this process once rank 0's is gone, however it went (then this one is re-parented)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"rank {argv[1]}: %(name)s: %(message)s")
    _exit_with_parent()
    job = json.loads(argv[2])
    run_worker(EngineConfig(**job["config"]), job["model_path"], int(argv[1]), job["address"], job["max_model_len"])

