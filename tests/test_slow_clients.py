"""Clients that hold a connection without finishing their request's body, and what the API key guards, against
real `python -m server` processes on 127.0.0.1 running a tiny random-weight Llama (it loads in seconds)."""
import signal
import socket
import time

import httpx
import pytest

from tests.helpers import assert_error, running_server, server_log, start_server, status, stop_server, tiny_llama

KEY = "slow-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PATIENCE = 30  # seconds a test waits for an answer that should take one or two


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def url(checkpoint):
    """With an API key, and one second for a request's body to arrive."""
    with running_server("--model", str(checkpoint), "--num-kv-blocks", "64", "--api-key", KEY,
                        "--request-body-timeout", "1") as base:
        yield base


def slow_body(url: str, headers: dict[str, str] = AUTH) -> socket.socket:
    """A connection that sends a request's headers announcing 100 bytes of body, then 4 of them, then nothing."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    lines = ["POST /v1/completions HTTP/1.1", f"Host: {host}", "Content-Type: application/json", "Content-Length: 100",
             *(f"{name}: {value}" for name, value in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b'{"mo')
    sock.settimeout(PATIENCE)
    return sock


def answer(sock: socket.socket) -> httpx.Response:
    """The response to a `slow_body` request, read as far as its Content-Length says."""
    reader = sock.makefile("rb")
    status_code = int(reader.readline().split()[1])
    headers = httpx.Headers([line.decode().rstrip("\r\n").split(": ", 1) for line in iter(reader.readline, b"\r\n")])
    return httpx.Response(status_code, headers=headers, content=reader.read(int(headers["content-length"])))


def test_a_body_slower_than_its_timeout_gets_408_and_a_closed_connection(url):
    started = time.monotonic()
    clients = [slow_body(url) for _ in range(8)]
    assert status(f"{url}/health") == 200  # while they hold their connections
    for sock in clients:
        response = answer(sock)
        assert_error(response, 408, "request_timeout")
        assert response.headers["connection"] == "close" and sock.recv(1) == b""
        sock.close()
    assert time.monotonic() - started >= 1  # not before the timeout


def test_a_drain_answers_a_body_still_arriving_at_once_and_exits_cleanly(checkpoint):
    """The request has started no work, so it gets 503 rather than holding the drain for its whole timeout."""
    proc, url = start_server("--model", str(checkpoint), "--num-kv-blocks", "64", "--drain-timeout", "300",
                             "--request-body-timeout", "300")
    try:
        sock = slow_body(url)
        time.sleep(1)  # the request reaches the server and waits for the rest of its body
        proc.send_signal(signal.SIGTERM)
        response = answer(sock)  # within PATIENCE: long before either timeout
        assert_error(response, 503, "server_shutdown")
        assert response.headers["connection"] == "close" and sock.recv(1) == b""
        sock.close()
        assert proc.wait(timeout=PATIENCE) == 0
    finally:
        stop_server(proc)
    log = server_log(url)
    assert "draining: 1 requests in flight" in log  # the drain did find it waiting for its body
    assert "Traceback" not in log and "CancelledError" not in log, log


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"])
def test_the_documentation_needs_the_key(url, path):
    assert_error(httpx.get(f"{url}{path}"), 401, "invalid_api_key")
    assert httpx.get(f"{url}{path}", headers=AUTH).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_probes_and_metrics_need_no_key(url, path):
    assert status(f"{url}{path}") == 200


def test_the_key_is_checked_before_the_body_is_read(url):
    not_json = httpx.post(f"{url}/v1/completions", content=b"{bad json", headers={"Content-Type": "application/json"})
    assert_error(not_json, 401, "invalid_api_key")
    without_key = slow_body(url, headers={})
    assert_error(answer(without_key), 401, "invalid_api_key")  # not left waiting for the rest, nor a 408
    without_key.close()
