"""The serving benchmark: a fixed, seeded workload of streaming requests against any OpenAI-compatible server (this one,
llama.cpp's llama-server, vLLM), at one concurrency level after another.

    python -m server.bench --url http://127.0.0.1:8000 --concurrency 1,16,64
    python -m server.bench --serve --serve-args "--max-num-seqs 64" --json bench.json

Each level keeps `concurrency` requests in flight until its requests are done and prints a row: output tokens/s and
requests/s over the level's wall time; time to first token (TTFT: from sending to the first chunk that carries
text), inter-token latency (ITL: the gaps between a request's successive chunks that carry text) and end-to-end
latency, each as p50, p90 and p99; and the requests that failed. Output tokens are the server's own count (the
final usage chunk, asked for with `stream_options.include_usage`), or the text-bearing chunks where it sends none.
Each level gets prompts of its own, so no server's prefix cache serves one level from the one before.
"""
import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from server import bench_workload

PERCENTILES = (50, 90, 99)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the server's base URL, a trailing /v1 or not (default: %(default)s)")
    p.add_argument("--serve", action="store_true", help="start this project's server (python -m server) on a free "
                   "port for the run, and stop it at the end")
    p.add_argument("--serve-args", default="", help='its arguments, one string, e.g. "--model m.gguf"')
    p.add_argument("--model", help="the model to name in requests (default: the first id of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="sent as a bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="streaming /v1/completions or /v1/chat/completions (the prompt as one user message)")
    p.add_argument("--concurrency", type=concurrency_levels, default="1,16,64",
                   help="comma-separated levels, run in this order (default: %(default)s)")
    p.add_argument("--requests", type=int, help="requests per level (default: twice the level, at least 8: two "
                   "full waves of requests)")
    p.add_argument("--prompt-tokens", type=int, default=100,
                   help="length of the synthetic prompts, seeded random common words (default: %(default)s); exact "
                   "where the server offers /tokenize (this one, vLLM, llama-server), else approximate (one word a "
                   "token, as the server's tokenizer is not at hand)")
    p.add_argument("--prompts-file", help='a JSONL file of {"prompt": ...} lines to send instead, in file order')
    p.add_argument("--output-tokens", type=int, default=128,
                   help="max_tokens of every request, with ignore_eos (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts (and, above temperature 0, the sampling: "
                   "request i sends seed + i) (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may wait for its next bytes (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write the figures, configuration and URL to PATH")
    args = p.parse_args(argv)
    if min(args.concurrency + [args.prompt_tokens, args.output_tokens, args.requests or 1]) < 1:
        p.error("concurrency levels, --requests, --prompt-tokens and --output-tokens must be positive")
    return args


def concurrency_levels(text: str) -> list[int]:
    return [int(level) for level in text.split(",")]


def requests_at(args, concurrency: int) -> int:
    return args.requests or max(2 * concurrency, 8)


def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile, interpolating between the nearest ranks (numpy's default); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    below = int(rank)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (rank - below)


def spread(values: list[float], scale: float = 1.0) -> dict[str, float | None]:
    """p50, p90 and p99 of `values`, times `scale` (seconds to milliseconds)."""
    return {f"p{p}": None if (v := percentile(values, p)) is None else v * scale for p in PERCENTILES}


@dataclass
class Result:
    """One request: when its text-bearing chunks arrived (seconds since it was sent) and what it counted."""
    times: list[float] = field(default_factory=list)
    e2e: float = 0.0
    usage_tokens: int | None = None  # the server's count of output tokens, from the final usage chunk
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return len(self.times) if self.usage_tokens is None else self.usage_tokens

    @property
    def ttft(self) -> float | None:
        return self.times[0] if self.times else None

    @property
    def itl(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.times, self.times[1:])]


def chunk_text(chunk: dict) -> str:
    """The text a stream chunk carries, of a completion (`text`) or a chat (`delta.content`)."""
    choices = chunk.get("choices") or []
    return "".join(c.get("text") or (c.get("delta") or {}).get("content") or "" for c in choices)


def read_event(result: Result, data: str, elapsed: float) -> bool:
    """Takes in one SSE `data:` payload that arrived `elapsed` seconds after sending; False at the stream's end."""
    if data == "[DONE]":
        return False
    chunk = json.loads(data)
    if not isinstance(chunk, dict):
        raise ValueError(f"a chunk that is no JSON object: {data[:100]}")
    if "error" in chunk:
        result.error = str(chunk["error"])[:300]
        return False
    if chunk_text(chunk):
        result.times.append(elapsed)
    if usage := chunk.get("usage"):
        result.usage_tokens, result.prompt_tokens = usage.get("completion_tokens"), usage.get("prompt_tokens")
    return True


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent event stream, whose lines end at LF (or CRLF). Not httpx's `aiter_lines`:
    it also ends lines at U+2028, U+0085 and the like, which JSON leaves unescaped in the text of a chunk."""
    pending = b""
    async for piece in response.aiter_bytes():
        *lines, pending = (pending + piece).split(b"\n")
        for line in lines:
            text = line.decode().rstrip("\r")
            if text.startswith("data:"):
                yield text[5:].strip()


async def send(client: httpx.AsyncClient, path: str, body: dict) -> Result:
    """One streaming request, timed from just before it is sent."""
    result = Result()
    start = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
            else:
                async for data in sse_data(response):
                    if not read_event(result, data, time.perf_counter() - start):
                        break
    except (httpx.HTTPError, ValueError) as e:  # ValueError: a chunk that is not UTF-8 or not JSON
        result.error = f"{type(e).__name__}: {e}"[:300]
    result.e2e = time.perf_counter() - start
    return result


def request(args, model: str, prompt: str, index: int) -> tuple[str, dict]:
    """The path and body of request `index` of the run."""
    # ignore_eos is not OpenAI's, but vLLM, llama-server and this server take it: every request runs to max_tokens.
    body = {"model": model, "max_tokens": args.output_tokens, "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    if args.temperature > 0:
        body["seed"] = args.seed + index
    if args.endpoint == "chat":
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


class Progress:
    """A one-line bar on stderr, redrawn in place as requests finish."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self.failed, self.start = label, total, 0, 0, time.perf_counter()
        self.width = 0  # of the line last drawn, which `close` blanks out
        self.draw()

    def advance(self, failed: bool) -> None:
        self.done, self.failed = self.done + 1, self.failed + failed
        self.draw()

    def draw(self) -> None:
        filled = 30 * self.done // self.total
        errors = f", {self.failed} failed" if self.failed else ""
        line = (f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}{errors} "
                f"{time.perf_counter() - self.start:.0f}s")
        self.width = len(line)
        sys.stderr.write("\r" + line)
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\r" + " " * self.width + "\r")
        sys.stderr.flush()


async def run_level(client: httpx.AsyncClient, args, model: str, work: list[tuple[int, str]],
                    concurrency: int) -> dict:
    """`work` (request index, prompt), sent in order by `concurrency` workers, each sending its next request when its
    last one is done; the level's figures."""
    queue, results = iter(work), []
    progress = Progress(f"concurrency {concurrency}", len(work))

    async def worker():
        for index, prompt in queue:  # one iterator shared by the workers: the order stays the workload's
            result = await send(client, *request(args, model, prompt, index))
            results.append(result)
            progress.advance(result.error is not None)

    async def ticker():  # the clock moves on while long requests run
        while True:
            await asyncio.sleep(1)
            progress.draw()

    start, clock = time.perf_counter(), asyncio.create_task(ticker())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    duration = time.perf_counter() - start
    clock.cancel()
    progress.close()
    return figures(results, concurrency, duration)


def figures(results: list[Result], concurrency: int, duration: float) -> dict:
    """A level's row: throughput over its wall time, latencies over its successful requests."""
    done = [r for r in results if r.error is None]
    tokens = sum(r.output_tokens for r in done)
    prompt_tokens = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(done),
            "duration_s": duration, "output_tokens": tokens, "output_tokens_per_s": tokens / duration,
            "requests_per_s": len(done) / duration,
            "ttft_ms": spread([r.ttft for r in done if r.ttft is not None], 1000),
            "itl_ms": spread([gap for r in done for gap in r.itl], 1000), "e2e_s": spread([r.e2e for r in done]),
            "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else None,
            "error_samples": [r.error for r in results if r.error][:3]}


HEADER = ("conc", "reqs", "errors", "out tok/s", "req/s", "TTFT p50", "p90", "p99", "ITL p50", "p90", "p99",
          "E2E p50", "p90", "p99")


def row(cells) -> str:
    return "".join(f"{c:>10}" if i > 2 else f"{c:>7}" for i, c in enumerate(cells))


def table_row(level: dict) -> str:
    def num(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"
    latencies = [num(level[key][f"p{p}"], digits) for key, digits in (("ttft_ms", 1), ("itl_ms", 1), ("e2e_s", 2))
                 for p in PERCENTILES]
    return row([level["concurrency"], level["requests"], level["errors"], num(level["output_tokens_per_s"], 1),
                num(level["requests_per_s"], 2), *latencies])


async def bench(args, url: str) -> dict:
    """Every level in turn, a row printed as each ends; the whole run's figures and configuration."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency), max_keepalive_connections=max(args.concurrency))
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=args.timeout) as client:
        model = args.model or await bench_workload.first_model(client)
        counter = None if args.prompts_file else await bench_workload.token_counter(client, model)
        sizes = [requests_at(args, level) for level in args.concurrency]
        prompts = list(enumerate(await bench_workload.prompts(args, sum(sizes), counter)))
        print(f"{url}  model {model}  /v1/{'chat/' * (args.endpoint == 'chat')}completions  prompts: "
              f"{bench_workload.describe(args, counter)}  output: {args.output_tokens} tokens (ignore_eos)")
        print("TTFT and ITL in milliseconds, E2E in seconds")
        print(row(HEADER), flush=True)
        levels = []
        for level, size in zip(args.concurrency, sizes):
            work, prompts = prompts[:size], prompts[size:]
            levels.append(await run_level(client, args, model, work, level))
            print(table_row(levels[-1]), flush=True)
            for sample in levels[-1]["error_samples"]:
                print(f"  error: {sample}", file=sys.stderr)
    config = {k: v for k, v in vars(args).items() if k not in ("api_key", "json", "url")}
    config |= {"model": model, "exact_prompt_length": counter is not None}
    return {"url": url, "config": config, "levels": levels}


def main(argv=None) -> None:
    args = parse_args(argv)
    # SIGTERM and SIGHUP unwind like Ctrl-C does, so that `--serve`'s server is stopped on the way out.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    server = bench_workload.served(args.serve_args, args.api_key) if args.serve else contextlib.nullcontext(args.url)
    try:
        with server as url:
            run = asyncio.run(bench(args, url.rstrip("/").removesuffix("/v1")))
    except KeyboardInterrupt:  # Ctrl-C: the server is stopped by now, and a traceback would say nothing more
        sys.exit(130)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(run, f, indent=2)


if __name__ == "__main__":
    main()
