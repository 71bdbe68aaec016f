"""Test helpers: a model on a small paged cache without the engine, and a real server process."""
import atexit
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from pathlib import Path

import httpx
import torch

from models.attention import AttentionMetadata
from models.tokenizer import load_tokenizer

VOCAB = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "vocab"
FAULTS = Path(__file__).parent / "faults"  # the fault-injection hooks: see faults/sitecustomize.py


class SingleSequence:
    """One sequence written into a private block pool, `block_size` tokens a block, on the model's device."""

    def __init__(self, model, capacity: int, block_size: int = 4, cache_dtype: torch.dtype = torch.float32):
        cfg = model.config
        num_blocks = -(-capacity // block_size)
        shape = (2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.model, self.block_size = model, block_size
        self.device = model.model.embed_tokens.weight.device
        self.caches = [torch.zeros(shape, dtype=cache_dtype, device=self.device) for _ in range(cfg.num_layers)]
        # Use the blocks in reverse so that block order and token order differ.
        self.table = torch.arange(num_blocks - 1, -1, -1, device=self.device)
        self.length = 0

    @torch.inference_mode()
    def feed(self, ids: list[int]) -> torch.Tensor:
        """Append tokens; returns the logits of each new position, [len(ids), vocab], on the model's device."""
        positions = torch.arange(self.length, self.length + len(ids), device=self.device)
        self.length += len(ids)
        slots = self.table[positions // self.block_size] * self.block_size + positions % self.block_size
        prefill = len(ids) > 1
        meta = AttentionMetadata(
            query_lens=[len(ids)], context_lens=[self.length], num_prefills=int(prefill), slot_mapping=slots,
            block_tables=self.table[None],
            decode_context_lens=torch.tensor([] if prefill else [self.length], device=self.device))
        hidden = self.model(torch.tensor(ids, device=self.device), positions, self.caches, meta)
        return self.model.compute_logits(hidden)


@functools.cache
def _log_dir() -> Path:
    """One folder of server logs per test run, removed at its end."""
    folder = tempfile.TemporaryDirectory(prefix="nanoserve-test-logs-")
    atexit.register(folder.cleanup)
    return Path(folder.name)


def start_server(*args: str, env: dict | None = None, wait: bool = True,
                 launcher: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """`python LAUNCHER -m server ARGS` (a launcher such as torchrun's `-m torch.distributed.run ...`) on a free port
    of 127.0.0.1 in a process group of its own, its output in a log file whose end a failure to start shows; with
    `wait`, returns once /ready says 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = _log_dir() / f"server-{port}.log"
    with open(log, "w") as out:  # the child keeps its own copy of the file
        proc = subprocess.Popen([sys.executable, *launcher, "-m", "server", *args, "--host", "127.0.0.1",
                                 "--port", str(port)],
                                env={**os.environ, **(env or {})}, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while wait and status(f"{url}/ready") != 200:
        if time.time() > deadline or proc.poll() is not None:
            stop_server(proc)
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
            raise RuntimeError(f"the server did not become ready (exit code {proc.poll()}); its log ends:\n{tail}")
        time.sleep(0.5)
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def tiny_checkpoint(path: Path, model_class, config, vocab: str, special: dict) -> Path:
    """A checkpoint folder: seeded random tiny weights, a real vocabulary as tokenizer.json, its config."""
    torch.manual_seed(0)
    model_class(config).eval().save_pretrained(path)
    load_tokenizer(VOCAB / vocab).backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(special))
    return path


def tiny_llama(path: Path, context: int = 128) -> Path:
    """A random-weight Llama small enough to answer in milliseconds, with the real Llama-2 vocabulary: a server on it
    starts in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context)
    return tiny_checkpoint(path, LlamaForCausalLM, config, "ggml-vocab-llama-spm.gguf",
                           {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})


@contextlib.contextmanager
def running_server(*args: str, env: dict | None = None):
    """A ready server (see `start_server`); yields its base URL, and kills its process group at the end."""
    proc, url = start_server(*args, env=env)
    try:
        yield url
    finally:
        stop_server(proc)


def faults(**variables: float | int) -> dict[str, str]:
    """The environment of a server with the fault-injection hooks on, e.g. `faults(NANOSERVE_STEP_DELAY=0.01)`."""
    return {"PYTHONPATH": os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]),
            **{name: str(value) for name, value in variables.items()}}


def status(url: str) -> int | None:
    """The status code of GET `url`, or None when nothing answers."""
    try:
        return httpx.get(url).status_code
    except httpx.TransportError:
        return None


def metrics(url: str) -> dict[str, float]:
    """The server's `nanoserve:` series, by name and labels."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("nanoserve:")}


def assert_idle(url: str) -> None:
    """Nothing running or waiting and every KV block free, once aborts have reached the engine."""
    deadline = time.time() + 10
    while time.time() < deadline and metrics(url)["nanoserve:num_requests_running"]:
        time.sleep(0.1)
    m = metrics(url)
    assert (m["nanoserve:num_requests_running"], m["nanoserve:num_requests_waiting"],
            m["nanoserve:num_requests_queued"], m["nanoserve:kv_cache_usage_perc"]) == (0, 0, 0, 0)


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None,
                 text: str | None = None) -> dict:
    """The response is `status` with OpenAI's error envelope (and the code, param and words given); returns
    the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], error
    assert code is None or error["code"] == code, error
    assert param is None or error["param"] == param, error
    assert text is None or text in error["message"], error
    return error


def server_log(url: str) -> str:
    """What the server at `url`, started by `start_server`, has written to its log so far."""
    return (_log_dir() / f"server-{url.rsplit(':', 1)[1]}.log").read_text(errors="replace")
