"""The serving benchmark's setup (see server/bench.py): the model to name, the workload (seeded synthetic prompts of a
given token length, or the prompts of a JSONL file, in a fixed order) and the server that `--serve` starts."""
import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

# Common short English words, most of them one token (after a space) in the usual vocabularies: a prompt of N of them
# is about N tokens whichever server reads it.
WORDS = """
the of and to in is was for on are with as at be by this had not but from have they which one you were her all she
there would their we him been has when who will more no if out so said what up its about into than them can only
other new some could time these two may then do first any my now such like our over man me even most made after
also did many before must through back years where much your way well down should because each just those people
how too little state good very make world still own see men work long get here between both life being under never
day same another know while last might us great old year off come since against go came right used take three
states himself few house use during without again place around however home small found thought went say part
once general high upon school every water room city light left hand open sea river tree green blue red white black
""".split()

Counter = Callable[[str], Awaitable[int]]
SERVE_TIMEOUT = 600  # seconds for `--serve`'s server to answer: the first start may fetch the default model


def synthetic(count: int, words: int, rng: random.Random) -> list[list[str]]:
    """`count` prompts of `words` random words each. Random from the first word on, so no two share a KV block
    and no server's prefix cache serves one from another."""
    return [[rng.choice(WORDS) for _ in range(words)] for _ in range(count)]


def from_file(path: str, count: int) -> list[str]:
    """`count` prompts from a JSONL file of `{"prompt": ...}` lines, in file order, from the start again when the file
    runs out."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    prompts = [json.loads(line)["prompt"] for line in lines]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise SystemExit(f"{path}: expected lines of {{\"prompt\": \"...\"}}")
    return [prompts[i % len(prompts)] for i in range(count)]


async def first_model(client: httpx.AsyncClient) -> str:
    """The first model that GET /v1/models lists: the one model that these servers serve."""
    try:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, LookupError, TypeError) as e:
        raise SystemExit(f"no --model, and none read from {str(client.base_url).rstrip('/')}/v1/models: {e}")


def describe(args, counter: Counter | None) -> str:
    """The prompts, in a few words for the table's heading."""
    if args.prompts_file:
        return args.prompts_file
    return f"{args.prompt_tokens} tokens ({'by the server tokenizer' if counter else 'approximately'})"


async def token_counter(client: httpx.AsyncClient, model: str) -> Counter | None:
    """A function that counts a text's tokens with the server's own tokenizer, through `/tokenize` in vLLM's shape
    (ours and vLLM's) or llama-server's; None when the server answers neither."""
    shapes = (lambda text: {"model": model, "prompt": text},  # vLLM's: special tokens (BOS) counted by default
              lambda text: {"content": text, "add_special": True})  # llama-server's: BOS asked for, to match

    def counter(shape) -> Counter:
        async def count(text: str) -> int:
            response = await client.post("/tokenize", json=shape(text))
            response.raise_for_status()
            return len(response.json()["tokens"])
        return count

    for shape in shapes:
        count = counter(shape)
        try:
            if await count("hello world") > 0:  # llama-server answers vLLM's shape with no tokens at all
                return count
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
    return None


async def fit(count: Counter, words: list[str], tokens: int) -> str:
    """The longest run of `words` from the first whose text the server counts as at most `tokens` tokens, by bisection
    (a prompt's count grows with its words)."""
    low, high = 0, len(words)
    while low < high:
        middle = (low + high + 1) // 2
        if await count(" ".join(words[:middle])) <= tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])


async def prompts(args, total: int, count: Counter | None) -> list[str]:
    """The run's `total` prompts in the order they are sent: the file's, or synthetic ones of `--prompt-tokens`,
    trimmed to exactly that many by the server's tokenizer where it offers one (else one word a token)."""
    if args.prompts_file:
        return from_file(args.prompts_file, total)
    # Every word is at least one token, so `tokens` words are enough to fill `tokens` tokens.
    drawn = synthetic(total, args.prompt_tokens, random.Random(args.seed))
    if count is None:
        return [" ".join(words) for words in drawn]
    limit = asyncio.Semaphore(8)  # a few tokenize calls at a time: quick, and gentle on a small server

    async def one(words: list[str]) -> str:
        async with limit:
            return await fit(count, words, args.prompt_tokens)
    return list(await asyncio.gather(*(one(words) for words in drawn)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, log: str, headers: dict) -> None:
    """Until GET /v1/models answers 200 (it answers 503 while the model loads)."""
    deadline = time.monotonic() + SERVE_TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/v1/models", headers=headers, timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    with open(log, errors="replace") as f:
        tail = "".join(f.readlines()[-30:])
    raise SystemExit(f"the server did not start (exit code {proc.poll()}); its log ends:\n{tail}")


@contextlib.contextmanager
def served(serve_args: str, api_key: str | None):
    """`python -m server SERVE_ARGS` on a free port of 127.0.0.1, its output in a temporary log; yields its
    URL once it answers, and ends its process group however the run ends."""
    port = free_port()
    command = [sys.executable, "-m", "server", *shlex.split(serve_args), "--host", "127.0.0.1",
               "--port", str(port)]
    with tempfile.TemporaryDirectory(prefix="nanoserve-bench-") as folder:
        log = os.path.join(folder, "server.log")
        with open(log, "w") as out:  # the child keeps its own copy of the file
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            wait_ready(proc, f"http://127.0.0.1:{port}", log, headers)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's group, which drains and exits; SIGKILL if it has not after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            return
