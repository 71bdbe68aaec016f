"""The serving benchmark (`python -m server.bench`): its arithmetic on hand-made timings and streams, its workload's
order, and short runs against this server, started by the bench itself (`--serve`, completions) and already running
(chat). The server runs a tiny random-weight Llama, which starts in seconds; ignore_eos makes every request run to
max_tokens, so the tokens a run counts are known in advance."""
import asyncio
import json
import subprocess
import sys
from argparse import Namespace

import httpx
import pytest

from server import bench, bench_workload
from tests.helpers import running_server, tiny_llama

FIELDS = {"concurrency", "requests", "errors", "duration_s", "output_tokens", "output_tokens_per_s", "requests_per_s",
          "ttft_ms", "itl_ms", "e2e_s", "mean_prompt_tokens", "error_samples"}
REQUESTS, OUTPUT_TOKENS, PROMPT_TOKENS = 4, 8, 32


def test_percentiles_interpolate_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0, 5.0]  # unsorted on purpose
    assert [bench.percentile(values, p) for p in (0, 50, 90, 99, 100)] == pytest.approx([1, 3, 4.6, 4.96, 5])
    assert bench.percentile([7.0], 99) == 7.0 and bench.percentile([], 50) is None
    assert bench.spread([0.1, 0.2, 0.3], 1000) == pytest.approx({"p50": 200, "p90": 280, "p99": 298})


def test_ttft_and_itl_come_from_the_chunks_that_carry_text():
    result = bench.Result()
    events = [(0.05, {"choices": [{"delta": {"role": "assistant", "content": ""}}]}),  # a chat's first chunk: no text
              (0.25, {"choices": [{"delta": {"content": "Hi"}}]}),
              (0.30, {"choices": [{"delta": {"content": " there"}}]}),
              (0.45, {"choices": [{"delta": {}, "finish_reason": "length"}]}),
              (0.46, {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}})]
    assert all(bench.read_event(result, json.dumps(chunk), at) for at, chunk in events)
    assert not bench.read_event(result, "[DONE]", 0.47)
    assert result.ttft == 0.25 and result.itl == pytest.approx([0.05])
    assert (result.output_tokens, result.prompt_tokens) == (3, 9)  # the server's count wins over the 2 chunks


def test_a_stream_without_usage_counts_its_text_chunks():
    """As a server that ignores `stream_options` streams: the output tokens are the chunks that carry text. Line
    separators other than LF inside the JSON text end no line of the stream (httpx's `aiter_lines` would split there),
    nor do the CRs of CRLF line ends."""
    texts = ("a", " b\u2028c", "", " d\x85", "\u2029")
    events = [{"choices": [{"text": text}]} for text in texts] + [{"choices": [], "usage": None}]
    stream = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\r\n\r\n" for e in events) + "data: [DONE]\n\n"
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=stream))

    async def send():
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            return await bench.send(client, "/v1/completions", {})
    result = asyncio.run(send())
    assert result.error is None and result.output_tokens == 4 and len(result.itl) == 3


def test_a_refused_request_is_an_error():
    transport = httpx.MockTransport(lambda request: httpx.Response(400, json={"error": {"message": "no"}}))

    async def send():
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            return await bench.send(client, "/v1/completions", {})
    result = asyncio.run(send())
    assert result.error.startswith("HTTP 400") and bench.figures([result], 1, 1.0)["errors"] == 1


def test_the_workload_is_fixed_by_the_seed_and_trimmed_to_the_token_count():
    args = Namespace(prompts_file=None, prompt_tokens=20, seed=3)

    async def count(text: str) -> int:  # a BOS, then a token a word, two for the longer ones
        return 1 + sum(1 + (len(word) > 6) for word in text.split())

    first, again = (asyncio.run(bench_workload.prompts(args, 5, None)) for _ in range(2))
    assert first == again and len(set(first)) == 5 and all(len(p.split()) == 20 for p in first)
    assert first != asyncio.run(bench_workload.prompts(Namespace(**{**vars(args), "seed": 4}), 5, None))
    trimmed = asyncio.run(bench_workload.prompts(args, 5, count))
    for prompt, full in zip(trimmed, first):
        assert full.startswith(prompt) and asyncio.run(count(prompt)) <= 20
        assert asyncio.run(count(" ".join(full.split()[:len(prompt.split()) + 1]))) > 20  # one word more is too long


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny"))


def run_bench(tmp_path, *args: str) -> tuple[dict, str]:
    """The bench at levels 1 and 2, short: its JSON figures and its table."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "server.bench", "--concurrency", "1,2", "--requests", str(REQUESTS),
                           "--output-tokens", str(OUTPUT_TOKENS), "--prompt-tokens", str(PROMPT_TOKENS),
                           "--json", str(out), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()), proc.stdout


def check(run: dict, table: str, url: str | None = None) -> None:
    """Both levels, every figure, every token counted, no errors; the table has a row a level."""
    assert url is None or run["url"] == url
    assert run["config"]["concurrency"] == [1, 2] and run["config"]["exact_prompt_length"]
    assert [level["concurrency"] for level in run["levels"]] == [1, 2]
    for level in run["levels"]:
        assert set(level) == FIELDS and level["errors"] == 0 and level["requests"] == REQUESTS
        assert level["output_tokens"] == REQUESTS * OUTPUT_TOKENS and level["output_tokens_per_s"] > 0
        for key in ("ttft_ms", "itl_ms", "e2e_s"):
            assert set(level[key]) == {"p50", "p90", "p99"} and 0 < level[key]["p50"] <= level[key]["p99"]
    rows = [line.split() for line in table.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [r[:3] for r in rows] == [["1", str(REQUESTS), "0"], ["2", str(REQUESTS), "0"]]


def test_the_bench_starts_our_server_and_measures_it(checkpoint, tmp_path):
    serve_args = f"--model {checkpoint} --chat-template chatml --num-kv-blocks 64"
    run, table = run_bench(tmp_path, "--serve", "--serve-args", serve_args)
    check(run, table)
    # The prompts were trimmed with the server's own /tokenize: it counts exactly --prompt-tokens of each.
    assert all(level["mean_prompt_tokens"] == PROMPT_TOKENS for level in run["levels"])


def test_the_bench_drives_a_running_server_through_chat(checkpoint, tmp_path):
    with running_server("--model", str(checkpoint), "--chat-template", "chatml", "--num-kv-blocks", "64") as url:
        run, table = run_bench(tmp_path, "--url", f"{url}/v1", "--endpoint", "chat")
    check(run, table, url)
    assert run["config"]["endpoint"] == "chat"
