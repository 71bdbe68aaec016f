"""The ranks of tensor parallelism, seen from rank 0 (`models/parallel.py` says how the model is split).

Rank 0 is the engine's own process: it schedules, samples and detokenizes. Ranks 1..N-1 are worker processes
(`engine/worker.py`) that it starts, or that torchrun started beside it; each holds its share of the model and of the
KV cache. Before each forward pass (and each copy of blocks) rank 0 broadcasts what to do; every rank runs its share,
the model's all-reduces join them, and every rank ends with the gathered logits, which rank 0 samples from. The
collectives are torch.distributed's: gloo on the CPU, NCCL on CUDA.

A worker that dies is noticed within a second by a thread that watches the processes: the runner then refuses the
next step, and the callbacks given to `on_failure` run (the server's engine loop stops on it, /health says 503, and
the process exits 1)."""
import atexit
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.config import EngineConfig

log = logging.getLogger(__name__)
# A worker waits for the next step as long as the server stays idle: no timeout may end that wait.
IDLE_FOREVER = timedelta(days=3650)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def torchrun_rank() -> int:
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def join(rank: int, size: int, address: str, device: torch.device) -> None:
    """Join the ranks' process group, and give this rank its share of the CPU's cores."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=address, rank=rank,
                            world_size=size, timeout=IDLE_FOREVER)


def device_for_rank(device: torch.device, rank: int) -> torch.device:
    """Rank r on CUDA takes GPU r (of its node, under torchrun); on the CPU every rank shares the cores."""
    if device.type != "cuda":
        return device
    index = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def check_devices(device: torch.device, size: int) -> None:
    available = torch.cuda.device_count() if device.type == "cuda" else os.cpu_count() or 1
    if size > available:
        what = "CUDA devices" if device.type == "cuda" else "CPU cores"
        raise ValueError(f"--tensor-parallel-size {size} is more than the {available} {what} here")


class RankGroup:
    """Rank 0's handle on the other ranks: what it sends them, and a watch on the workers it started. torch.distributed
    holds one process group a process: a new RankGroup stops the ranks of the one before (whose engine can then run
    no step)."""
    _active: "RankGroup | None" = None

    def __init__(self, config: EngineConfig, model_path, max_model_len: int, device: torch.device):
        if RankGroup._active is not None:
            RankGroup._active.close()
        RankGroup._active = self
        self.size, self.failure = config.tensor_parallel_size, None
        self._callbacks: list[Callable[[Exception], None]] = []
        self._started = threading.Event()
        self.workers: list[subprocess.Popen] = []
        atexit.register(self.close)
        if launched_by_torchrun():
            join(0, self.size, "env://", device)
            return
        address = f"tcp://127.0.0.1:{_free_port()}"
        job = json.dumps({"config": asdict(config), "model_path": str(model_path), "max_model_len": max_model_len,
                          "address": address})
        start = "import sys; from engine.worker import main; main(sys.argv)"
        self.workers = [subprocess.Popen([sys.executable, "-c", start, str(rank), job]) for rank in range(1, self.size)]
        threading.Thread(target=self._watch, name="rank-watch", daemon=True).start()
        join(0, self.size, address, device)

    def send(self, kind: str, payload) -> None:
        if self.failure is not None:
            raise RuntimeError(self.failure)
        dist.broadcast_object_list([(kind, payload)], src=0)

    def on_failure(self, callback: Callable[[Exception], None]) -> None:
        self._callbacks.append(callback)

    def started(self) -> None:
        """Every rank has loaded its share: from now on a death reaches the `on_failure` callbacks."""
        self._started.set()

    def _watch(self) -> None:
        while self.failure is None:
            for rank, worker in enumerate(self.workers, start=1):
                if (code := worker.poll()) is not None:
                    self.failure = f"tensor-parallel rank {rank} exited with code {code}: the model is incomplete"
                    log.error("%s", self.failure)
                    for callback in self._callbacks:
                        callback(RuntimeError(self.failure))
                    self._unless_starting_ends(seconds=10)
                    return
            time.sleep(0.2)

    def _unless_starting_ends(self, seconds: float) -> None:
        """A rank that dies before it joins leaves rank 0 waiting for it inside torch.distributed, which nothing can
        interrupt: if the start neither ends nor fails within `seconds`, exit the process."""
        if not self._started.wait(seconds) and RankGroup._active is self:
            log.error("rank 0 is stuck waiting for the rank that died while starting: exiting")
            os._exit(1)

    def close(self) -> None:
        """Tell the workers to stop, wait for them and leave the process group (at exit, or for a new group)."""
        if RankGroup._active is not self:
            return
        RankGroup._active = None
        if self.failure is None and all(worker.poll() is None for worker in self.workers):
            self.failure = "the ranks were stopped"
            try:
                dist.broadcast_object_list([("stop", None)], src=0)
            except RuntimeError:  # a worker died meanwhile: it is stopped too
                pass
        self.failure = self.failure or "the ranks were stopped"
        for worker in self.workers:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


def receive() -> tuple[str, object]:
    """A worker's next order from rank 0."""
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
