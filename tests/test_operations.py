"""The process under operations, against real `python -m server` processes on 127.0.0.1 running a tiny random-weight
Llama whose every step the fault hooks (tests/faults) make take a fixed time longer, so that no outcome depends on how
fast the machine decodes: overload, deadlines, keep-alives, body limits and metrics on one small server; loading, a
signal while loading, drain, a second signal, a dying engine and a hung one each on a server of their own."""
import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.helpers import (assert_error, assert_idle, faults, metrics, server_log, start_server, status, stop_server,
                           tiny_llama)

MODEL = "smol"
STEP_DELAY = 0.01  # seconds added to each step: 400 tokens take 4 s at least, 40 tokens 0.4 s


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Tell me a long story.", "temperature": 0, **fields}


def events(response: httpx.Response) -> list[str]:
    """The SSE lines of a streamed response (pings included), without the blank separators."""
    return [line for line in response.iter_lines() if line]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny"), context=512)


def start(checkpoint, *flags: str, wait: bool = True, **fault_variables):
    """A server of its own on the tiny model, every step STEP_DELAY longer (and the faults given)."""
    return start_server("--model", str(checkpoint), "--served-model-name", MODEL, *flags, wait=wait,
                        env=faults(**{"NANOSERVE_STEP_DELAY": STEP_DELAY, **fault_variables}))


@pytest.fixture(scope="module")
def small(checkpoint):
    """Two sequences at a time, four prompts may wait, a ping after 0.2 s of silence."""
    proc, url = start(checkpoint, "--max-num-seqs", "2", "--max-queued-requests", "4", "--sse-ping-interval", "0.2")
    yield url
    stop_server(proc)


def test_a_burst_beyond_the_queue_gets_429_and_the_accepted_all_complete(small):
    before = metrics(small).get('nanoserve:request_errors_total{status="429"}', 0)

    async def burst():
        async with httpx.AsyncClient(base_url=small, timeout=120) as client:
            body = completion(prompt="Count to ten:", max_tokens=8, ignore_eos=True)
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


def test_a_queued_stream_gets_keep_alive_pings_and_counts_as_queued(small):
    """Two long requests hold both sequence slots (200 steps: 2 s at least); a third stream waits in the queue, says
    so, and counts in the queued gauge meanwhile."""
    def hold():
        httpx.post(f"{small}/v1/completions", json=completion(max_tokens=200, ignore_eos=True), timeout=120)
    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
    deadline = time.time() + 60  # both holders admitted before the third asks (a fixed sleep raced on a busy machine)
    while metrics(small).get("nanoserve:num_requests_running", 0) < 2:
        assert time.time() < deadline
        time.sleep(0.05)
    queued = []
    with httpx.stream("POST", f"{small}/v1/completions", json=completion(max_tokens=4, stream=True),
                      timeout=120) as response:
        lines = []
        for line in filter(None, response.iter_lines()):
            lines.append(line)
            if line == ": ping" and not queued:
                queued.append(metrics(small)["nanoserve:num_requests_queued"])
    for t in holders:
        t.join()
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    assert first_data >= 3 and set(lines[:first_data]) == {": ping"}
    assert lines[-1] == "data: [DONE]" and queued == [1]
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


def healthcheck(proc) -> int:
    """The Docker HEALTHCHECK's verdict on the server process `proc`, found by its command line."""
    return subprocess.run([sys.executable, "-m", "server.healthcheck", str(proc.pid)], capture_output=True).returncode


def test_loading_then_sigterm_drains_every_stream_and_exits_0(checkpoint):
    """While the model loads (3 s longer here) /health, /ready, the Docker health check and API requests all say no;
    then every stream in flight at SIGTERM finishes whole."""
    proc, url = start(checkpoint, "--drain-timeout", "300", wait=False, NANOSERVE_LOAD_DELAY=3)
    try:
        while status(f"{url}/health") is None:
            assert proc.poll() is None
            time.sleep(0.05)
        assert_error(httpx.get(f"{url}/health"), 503, "service_unavailable", text="loading")
        assert_error(httpx.get(f"{url}/ready"), 503, "service_unavailable", text="loading")
        assert_error(httpx.post(f"{url}/v1/completions", json=completion()), 503, "service_unavailable")
        assert healthcheck(proc) == 1
        while status(f"{url}/ready") != 200:
            assert proc.poll() is None
            time.sleep(0.05)
        assert status(f"{url}/health") == 200 and healthcheck(proc) == 0
        streaming, results = threading.Event(), []
        runner = threading.Thread(target=lambda: results.extend(_stream_all(url, 10, 40, streaming)))
        runner.start()
        assert streaming.wait(120)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert_error(httpx.get(f"{url}/ready"), 503)
        assert status(f"{url}/health") == 200  # draining is alive: liveness must not restart it meanwhile
        assert_error(httpx.post(f"{url}/v1/completions", json=completion()), 503, "server_shutdown")
        runner.join()
        assert proc.wait(timeout=60) == 0
    finally:
        stop_server(proc)
    for lines in results:
        assert lines[-1] == "data: [DONE]"
        finish, usage = (json.loads(line.removeprefix("data: ")) for line in lines[-3:-1])
        assert finish["choices"][0]["finish_reason"] == "length" and usage["usage"]["completion_tokens"] == 40


def test_sigterm_while_the_model_loads_exits_0_at_once(checkpoint):
    """Nothing was admitted, so nothing is lost: the process exits 0 at once, whether the signal comes while it still
    imports (before uvicorn takes the signals over) or while the model loads (60 s longer here)."""
    importing, _ = start_server("--model", str(checkpoint), wait=False)
    proc, url = start(checkpoint, wait=False, NANOSERVE_LOAD_DELAY=60)
    try:
        time.sleep(1)  # importing torch and the engine takes longer
        importing.send_signal(signal.SIGTERM)
        assert importing.wait(timeout=10) == 0
        while status(f"{url}/health") != 503:
            assert proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        stop_server(importing)
        stop_server(proc)
    assert "Traceback" not in server_log(url)


@pytest.mark.parametrize("second_signal", [False, True], ids=["drain-timeout", "second-signal"])
def test_a_drain_that_runs_out_of_time_or_patience(checkpoint, second_signal):
    """Past --drain-timeout the streams (400 steps: 4 s at least) end with an error event and the exit is 0; a second
    signal exits at once."""
    proc, url = start(checkpoint, "--drain-timeout", "1")
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


def _watch_health(proc, url: str) -> tuple[list[int | None], threading.Event]:
    """/health's answers, every few milliseconds until the process ends; the event is set once one came."""
    health: list[int | None] = []
    watching = threading.Event()

    def watch():
        while proc.poll() is None:
            health.append(status(f"{url}/health"))
            watching.set()
            time.sleep(0.005)
    threading.Thread(target=watch, daemon=True).start()
    return health, watching


def test_a_dead_engine_fails_requests_turns_health_503_and_exits_nonzero(checkpoint):
    proc, url = start(checkpoint, NANOSERVE_FAIL_ON_TOKEN=7777)
    health, watching = _watch_health(proc, url)
    try:
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


def test_a_hung_engine_turns_health_503_and_exits_1_but_slow_steps_do_not(checkpoint):
    """Steps of 1 s (STEP_DELAY raised) under a stall timeout of 3 s are slow, not hung: /health stays 200 through a
    request of several. A step that never returns is hung: its request gets a 500, /health 503, and the process
    exits 1 (hard: the engine thread cannot be joined)."""
    proc, url = start(checkpoint, "--engine-stall-timeout", "3", NANOSERVE_STEP_DELAY=1, NANOSERVE_HANG_ON_TOKEN=7777)
    health, watching = _watch_health(proc, url)
    try:
        assert watching.wait(10)
        slow = httpx.post(f"{url}/v1/completions", json=completion(max_tokens=3, ignore_eos=True), timeout=60)
        assert slow.status_code == 200 and set(health) == {200}
        started = time.monotonic()
        hung = httpx.post(f"{url}/v1/completions", json=completion(prompt=[1, 7777, 2]), timeout=60)
        assert proc.wait(timeout=30) == 1
        took = time.monotonic() - started
    finally:
        stop_server(proc)
    assert_error(hung, 500, "engine_dead", text="hung")
    assert 3 < took < 20 and 503 in health
    assert "longer than the engine stall timeout" in server_log(url)
