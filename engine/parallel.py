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
import contextlib
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


def join(rank: int, size: int, address: str, device: torch.device):
    """Join the ranks' process group, give this rank its share of the CPU's cores, and return the group that carries
    rank 0's orders: gloo's (the default one on the CPU; a second one beside NCCL's on CUDA, so that orders need no
    GPU and never mix with recorded collectives)."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=address, rank=rank,
                            world_size=size, timeout=IDLE_FOREVER)
    if device.type != "cuda":
        return None
    dist.all_reduce(torch.zeros(1, device=device))  # NCCL takes its buffers now, before the KV cache is sized
    return dist.new_group(backend="gloo", timeout=IDLE_FOREVER)


def device_for_rank(device: torch.device, rank: int) -> torch.device:
    """Rank r on CUDA takes GPU r (torchrun's LOCAL_RANK under torchrun); on the CPU every rank shares the cores."""
    if device.type != "cuda":
        return device
    index = int(os.environ.get("LOCAL_RANK", rank)) if launched_by_torchrun() else rank
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def check_devices(device: torch.device, size: int) -> None:
    available = torch.cuda.device_count() if device.type == "cuda" else os.cpu_count() or 1
    if size > available:
        what = "CUDA devices" if device.type == "cuda" else "CPU cores"
        raise ValueError(f"--tensor-parallel-size {size} is more than the {available} {what} here")
    if launched_by_torchrun() and size != int(os.environ["WORLD_SIZE"]):
        raise ValueError(f"--tensor-parallel-size {size}, but torchrun started {os.environ['WORLD_SIZE']} ranks")


class RankGroup:
    """Rank 0's handle on the other ranks: what it sends them, and a watch on the workers it started (under torchrun,
    torchrun ends every rank when one fails). torch.distributed holds one process group a process: a new RankGroup
    stops the ranks of the one before (whose engine can then run no step)."""
    _active: "RankGroup | None" = None

    def __init__(self, config: EngineConfig, model_path, max_model_len: int, device: torch.device):
        if RankGroup._active is not None:
            RankGroup._active.close()
        RankGroup._active = self
        self.size, self.failure, self.busy = config.tensor_parallel_size, None, False
        self._callbacks: list[Callable[[Exception], None]] = []
        self._started = threading.Event()
        self.workers: list[subprocess.Popen] = []
        atexit.register(self.close)
        if launched_by_torchrun():
            self.orders = join(0, self.size, "env://", device)
            return
        address = f"tcp://127.0.0.1:{_free_port()}"
        job = json.dumps({"config": asdict(config), "model_path": str(model_path), "max_model_len": max_model_len,
                          "address": address})
        start = "import sys; from engine.worker import main; main(sys.argv)"
        env = {name: value for name, value in os.environ.items() if name not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        self.workers = [subprocess.Popen([sys.executable, "-c", start, str(rank), job], env=env)
                        for rank in range(1, self.size)]
        threading.Thread(target=self._watch, name="rank-watch", daemon=True).start()
        self.orders = join(0, self.size, address, device)

    @contextlib.contextmanager
    def leading(self, kind: str, payload):
        """Send every rank the order, then do rank 0's part of it inside the block."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        self.busy = True
        try:
            dist.broadcast_object_list([(kind, payload)], src=0, group=self.orders)
            yield
        finally:
            self.busy = False

    def started(self) -> None:
        """Every rank has loaded its share."""
        self._started.set()

    def on_failure(self, callback: Callable[[Exception], None]) -> None:
        """`callback(error)` when a worker dies (at once if one has)."""
        self._callbacks.append(callback)
        if self.failure is not None:
            callback(RuntimeError(self.failure))

    def _watch(self) -> None:
        while self.failure is None:
            for rank, worker in enumerate(self.workers, start=1):
                if (code := worker.poll()) is not None:
                    self.failure = f"tensor-parallel rank {rank} exited with code {code}: the model is incomplete"
                    log.error("%s", self.failure)
                    for callback in self._callbacks:
                        callback(RuntimeError(self.failure))
                    self._exit_if_stuck(seconds=10)
                    return
            time.sleep(0.2)

    def _exit_if_stuck(self, seconds: float) -> None:
        """Rank 0 may be waiting inside a collective for the dead rank (while the ranks start, or in a step on NCCL,
        which never gives up on a peer), which nothing can interrupt: exit the process if it still is after
        `seconds`. gloo's collectives fail on their own, and an idle engine hears of the failure by its callback."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and RankGroup._active is self:
            time.sleep(0.2)
        if RankGroup._active is self and (self.busy or not self._started.is_set()):
            log.error("rank 0 is stuck waiting for the rank that died: exiting")
            os._exit(1)

    def close(self) -> None:
        """Stop the workers (an order to stop; or, after a failure or during a step, a kill) and leave the process
        group (at exit, or for a new group)."""
        if RankGroup._active is not self:
            return
        RankGroup._active = None
        orderly = self.failure is None and not self.busy and all(w.poll() is None for w in self.workers)
        self.failure = self.failure or "the ranks were stopped"
        if orderly:
            dist.broadcast_object_list([("stop", None)], src=0, group=self.orders)
        else:
            for worker in self.workers:
                worker.kill()
        deadline = time.monotonic() + 10
        for worker in self.workers:
            try:
                worker.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
        if orderly:  # NCCL's teardown can hang on a dead peer: a failed group is left to the process's end
            dist.destroy_process_group()


def receive(orders) -> tuple[str, object]:
    """A worker's next order from rank 0, over `join`'s group for orders."""
    box = [None]
    dist.broadcast_object_list(box, src=0, group=orders)
    return box[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
