"""The process under operations, against real `python -m server` processes on 127.0.0.1: overload, deadlines,
keep-alives, body limits and metrics on one small server; loading, drain, a second signal and a dying engine
each on a server of their own."""
import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import assert_error, assert_idle, metrics, running_server, start_server, status, stop_server

MODEL = "smol"
FAULTS = Path(__file__).parent / "faults"


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Tell me a long story.", "temperature": 0, **fields}


def events(response: httpx.Response) -> list[str]:
    """The SSE lines of a streamed response (pings included), without the blank separators."""
    return [line for line in response.iter_lines() if line]


@pytest.fixture(scope="module")
def small(default_model_path):
    """Two sequences at a time, four prompts may wait, a ping after 0.2 s of silence."""
    with running_server("--model", str(default_model_path), "--served-model-name", MODEL, "--max-model-len", "512",
                        "--max-num-seqs", "2", "--max-queued-requests", "4", "--sse-ping-interval", "0.2") as url:
        yield url


def test_a_burst_beyond_the_queue_gets_429_and_the_accepted_all_complete(small):
    before = metrics(small).get('nanoserve:request_errors_total{status="429"}', 0)

    async def burst():
        async with httpx.AsyncClient(base_url=small, timeout=120) as client:
            body = completion(prompt="Count to ten:", max_tokens=8)
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(16)))
    responses = asyncio.run(burst())
    accepted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(accepted) >= 4 and refused
    for r in refused:
        assert_error(r, 429, "rate_limit_exceeded")
        assert int(r.headers["Retry-After"]) >= 1
    texts = {r.json()["choices"][0]["text"] for r in accepted}
    assert len(texts) == 1 and all(r.json()["usage"]["completion_tokens"] == 8 for r in accepted)
    assert metrics(small)['nanoserve:request_errors_total{status="429"}'] - before == len(refused)
    assert_idle(small)


def test_more_prompts_than_the_queue_holds_is_a_400_not_a_429_forever(small):
    response = httpx.post(f"{small}/v1/completions", json=completion(prompt=["a", "b", "c", "d", "e"]), timeout=60)
    assert_error(response, 400, "too_many_prompts")


def test_a_queued_stream_gets_keep_alive_pings(small):
    """Two long requests hold both sequence slots; a third stream waits in the queue, and says so. The holders
    run for seconds (2 x 40 tokens took under a second once decoding got faster: too few pings to count)."""
    def hold():
        httpx.post(f"{small}/v1/completions", json=completion(max_tokens=200, ignore_eos=True), timeout=120)
    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
    deadline = time.time() + 60  # both holders admitted before the third asks (a fixed sleep raced on a busy machine)
    while metrics(small).get("nanoserve:num_requests_running", 0) < 2:
        assert time.time() < deadline
        time.sleep(0.05)
    with httpx.stream("POST", f"{small}/v1/completions", json=completion(max_tokens=4, stream=True),
                      timeout=120) as response:
        lines = events(response)
    for t in holders:
        t.join()
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    assert first_data >= 3 and set(lines[:first_data]) == {": ping"}
    assert lines[-1] == "data: [DONE]"
    assert_idle(small)


def test_a_request_past_its_deadline_is_aborted_and_frees_its_blocks(small):
    body = completion(max_tokens=400, ignore_eos=True)
    timed = {"X-Request-Timeout": "1"}
    started = time.time()
    assert_error(httpx.post(f"{small}/v1/completions", json=body, headers=timed, timeout=60), 408,
                 "request_timeout")
    assert time.time() - started < 10
    with httpx.stream("POST", f"{small}/v1/completions", json={**body, "stream": True}, headers=timed,
                      timeout=60) as response:
        lines = events(response)
    assert response.status_code == 200 and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"
    assert_idle(small)
    error = assert_error(httpx.post(f"{small}/v1/completions", json=body, headers={"X-Request-Timeout": "soon"}), 400)
    assert error["param"] == "X-Request-Timeout"


def test_a_body_over_the_limit_gets_413(small):
    body = json.dumps(completion(prompt="a" * (10 << 20))).encode()
    assert_error(httpx.post(f"{small}/v1/completions", content=body, headers={"Content-Type": "application/json"},
                            timeout=60), 413, "request_too_large")
    pieces = iter([body[i:i + 2**20] for i in range(0, len(body), 2**20)])  # sent chunked: no Content-Length
    chunked = httpx.post(f"{small}/v1/completions", content=pieces, headers={"Content-Type": "application/json"},
                         timeout=60)
    assert_error(chunked, 413, "request_too_large")
    assert status(f"{small}/health") == 200


def test_metrics_cover_latency_lengths_and_errors(small):
    httpx.post(f"{small}/v1/completions", json=completion(max_tokens=3), timeout=60)
    httpx.post(f"{small}/v1/completions", json=completion(model="nope"), timeout=60)
    m = metrics(small)
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prompt_tokens", "request_generation_tokens"):
        assert m[f"nanoserve:{name}_count"] >= 1 and f'nanoserve:{name}_bucket{{le="+Inf"}}' in m
    assert m['nanoserve:request_errors_total{status="404"}'] >= 1
    assert m['nanoserve:request_success_total{finished_reason="length"}'] >= 1
    assert "nanoserve:num_preemptions_total" in m and m["nanoserve:prompt_tokens_total"] > 0


def _stream_all(url: str, count: int, max_tokens: int, streaming: threading.Event) -> list[list[str]]:
    """`count` streams at once, in a thread; `streaming` is set once each has its first token."""
    results: list[list[str]] = [[] for _ in range(count)]
    first_tokens = threading.Semaphore(0)

    def one(i: int):
        body = completion(prompt=f"Story number {i}:", max_tokens=max_tokens, ignore_eos=True, stream=True,
                          stream_options={"include_usage": True})
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data:") and not results[i]:
                        first_tokens.release()
                    if line:
                        results[i].append(line)
        except httpx.RemoteProtocolError:
            results[i].append("cut")
    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()

    def wait_for_first_tokens():
        for _ in range(count):
            first_tokens.acquire()
        streaming.set()
    threading.Thread(target=wait_for_first_tokens, daemon=True).start()
    for t in threads:
        t.join()
    return results


def test_a_model_that_fails_to_load_exits_1_and_never_says_ready(tmp_path):
    """A broken checkpoint: the process ends with 1 (the orchestrator restarts it or reports it), and readiness
    never said 200 on the way (a file this broken may fail before the port even answers)."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    proc, url = start_server("--model", str(broken), wait=False)
    try:
        seen = set()
        while proc.poll() is None:
            seen.add(status(f"{url}/ready"))
            time.sleep(0.05)
        assert proc.returncode == 1 and 200 not in seen
    finally:
        stop_server(proc)


def test_loading_then_sigterm_drains_every_stream_and_exits_0(default_model_path):
    proc, url = start_server("--model", str(default_model_path), "--served-model-name", MODEL, "--drain-timeout", "300",
                             wait=False)
    try:
        seen = set()
        while status(f"{url}/ready") != 200:
            assert proc.poll() is None
            if status(f"{url}/health") == 200:
                response = httpx.post(f"{url}/v1/completions", json=completion())
                seen.add(response.status_code)
                if response.status_code == 503:
                    assert_error(response, 503, "service_unavailable")  # loading: not shutting down
            time.sleep(0.05)
        assert 503 in seen  # answered, and refused, while the model loaded
        streaming, results = threading.Event(), []
        runner = threading.Thread(target=lambda: results.extend(_stream_all(url, 10, 40, streaming)))
        runner.start()
        assert streaming.wait(120)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert_error(httpx.get(f"{url}/ready"), 503)
        assert_error(httpx.post(f"{url}/v1/completions", json=completion()), 503, "server_shutdown")
        runner.join()
        assert proc.wait(timeout=60) == 0
    finally:
        stop_server(proc)
    for lines in results:
        assert lines[-1] == "data: [DONE]"
        finish, usage = (json.loads(line.removeprefix("data: ")) for line in lines[-3:-1])
        assert finish["choices"][0]["finish_reason"] == "length" and usage["usage"]["completion_tokens"] == 40


@pytest.mark.parametrize("second_signal", [False, True], ids=["drain-timeout", "second-signal"])
def test_a_drain_that_runs_out_of_time_or_patience(default_model_path, second_signal):
    """Past --drain-timeout the streams end with an error event and the exit is 0; a second signal exits
    at once."""
    proc, url = start_server("--model", str(default_model_path), "--served-model-name", MODEL, "--drain-timeout", "1")
    try:
        streaming, results = threading.Event(), []
        runner = threading.Thread(target=lambda: results.extend(_stream_all(url, 2, 400, streaming)))
        runner.start()
        assert streaming.wait(120)
        proc.send_signal(signal.SIGTERM)
        if second_signal:
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 128 + signal.SIGTERM
        else:
            assert proc.wait(timeout=30) == 0
        runner.join()
    finally:
        stop_server(proc)
    for lines in results:
        if second_signal:
            assert lines[-1] == "cut"
        else:
            assert lines[-1] == "data: [DONE]"
            assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "server_shutdown"


def test_a_dead_engine_fails_requests_turns_health_503_and_exits_nonzero(default_model_path):
    env = {"PYTHONPATH": os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]),
           "NANOSERVE_FAIL_ON_TOKEN": "7777"}
    proc, url = start_server("--model", str(default_model_path), "--served-model-name", MODEL, env=env)
    health: list[int | None] = []
    watching = threading.Event()

    def watch():
        while proc.poll() is None:
            health.append(status(f"{url}/health"))
            watching.set()
            time.sleep(0.005)
    try:
        threading.Thread(target=watch, daemon=True).start()
        streaming, results = threading.Event(), []
        runner = threading.Thread(target=lambda: results.extend(_stream_all(url, 1, 400, streaming)))
        runner.start()
        assert streaming.wait(120) and watching.wait(10)
        poisoned = httpx.post(f"{url}/v1/completions", json=completion(prompt=[1, 7777, 2]), timeout=60)
        runner.join()
        assert proc.wait(timeout=30) != 0
    finally:
        stop_server(proc)
    assert_error(poisoned, 500, "engine_dead")
    assert json.loads(results[0][-2].removeprefix("data: "))["error"]["code"] == "engine_dead"
    assert health[0] == 200 and 503 in health
