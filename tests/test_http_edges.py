"""What clients and operators used to vLLM expect at the HTTP edge, against real `python -m server` processes
running a tiny random-weight Llama: CORS (preflights answered without the API key, refusals readable by the page),
request ids (echoed, made when absent, logged with each request's status, tokens and timings) and the model card."""
import re
import time

import httpx
import openai
import pytest

from server.flags import parse_args
from tests.helpers import assert_error, running_server, server_log, tiny_llama

KEY = "edge-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny"
MAX_MODEL_LEN = 100  # below the checkpoint's 128, so that the card shows the server's limit, not the model's
ORIGIN = "https://example.com"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
GENERATED_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex
PATIENCE = 30  # seconds to wait for a log line that should take milliseconds


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def url(checkpoint):
    """The default CORS flags, an API key, and bodies of at most 10 KiB."""
    with running_server("--model", str(checkpoint), "--served-model-name", MODEL, "--num-kv-blocks", "64",
                        "--chat-template", "chatml", "--max-model-len", str(MAX_MODEL_LEN), "--api-key", KEY,
                        "--max-request-body-mib", "0.01") as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def log_line(url: str, request_id: str) -> str:
    """The server's log line for the request with that id, once written (after the response's last byte)."""
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        lines = [line for line in server_log(url).splitlines() if f": {request_id} " in line]
        if lines:
            assert len(lines) == 1, lines
            return lines[0]
        time.sleep(0.1)
    raise AssertionError(f"no log line for request {request_id}")


def test_a_preflight_needs_no_key_and_the_request_it_announces_does(url):
    preflight = httpx.options(f"{url}/v1/chat/completions", headers=PREFLIGHT)
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"].split(", ")
    assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"

    refused = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN})
    assert_error(refused, 401, "invalid_api_key")
    assert refused.headers["access-control-allow-origin"] == "*"  # else the page cannot read why
    assert refused.headers["access-control-expose-headers"] == "X-Request-Id"
    assert "POST /v1/chat/completions 401 total=" in log_line(url, refused.headers["x-request-id"])

    answered = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN, **AUTH}, timeout=60)
    assert answered.status_code == 200, answered.text
    assert answered.headers["access-control-allow-origin"] == "*"


def test_only_the_allowed_origins_pass_a_preflight(checkpoint):
    with running_server("--model", str(checkpoint), "--num-kv-blocks", "64", "--allow-credentials",
                        "--allowed-origins", '["https://good.example"]') as base:
        refused = httpx.options(f"{base}/v1/completions", headers=PREFLIGHT)
        assert refused.status_code == 400 and "origin" in refused.text  # Starlette's "Disallowed CORS origin"
        assert "access-control-allow-origin" not in refused.headers

        allowed = httpx.options(f"{base}/v1/completions", headers={**PREFLIGHT, "Origin": "https://good.example"})
        assert allowed.status_code == 200, allowed.text
        assert allowed.headers["access-control-allow-origin"] == "https://good.example"
        assert allowed.headers["access-control-allow-credentials"] == "true"

        foreign = httpx.get(f"{base}/v1/models", headers={"Origin": ORIGIN})
        assert foreign.status_code == 200 and "access-control-allow-origin" not in foreign.headers


def test_a_request_id_is_echoed_and_logged_with_status_tokens_and_timings(url, client):
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="Hello there", max_tokens=4, extra_body={"ignore_eos": True},
        extra_headers={"X-Request-Id": "trace-42"})
    assert raw.headers["x-request-id"] == "trace-42"
    completion = raw.parse()
    assert completion._request_id == "trace-42"  # what the SDK reads off the response
    usage = completion.usage
    assert usage.completion_tokens == 4
    line = log_line(url, "trace-42")
    assert re.search(rf"POST /v1/completions 200 prompt_tokens={usage.prompt_tokens} completion_tokens=4 "
                     r"ttft=\d+\.\d{3}s total=\d+\.\d{3}s$", line), line


def test_a_stream_logs_its_tokens_when_it_ends(url, client):
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT["messages"], max_tokens=5, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": "stream-7"})
    assert stream.response.headers["x-request-id"] == "stream-7"
    usage = [chunk.usage for chunk in stream if chunk.usage][0]
    line = log_line(url, "stream-7")
    assert (f"POST /v1/chat/completions 200 prompt_tokens={usage.prompt_tokens} completion_tokens=5 ttft="
            in line), line


@pytest.mark.parametrize("given", [None, "", "x" * 129, "two words", "caf\xe9", "line\x7f"],
                         ids=["absent", "empty", "too-long", "space", "non-ascii", "control"])
def test_a_request_without_a_fit_id_gets_a_new_one(url, given):
    headers = AUTH if given is None else {**AUTH, "X-Request-Id": given.encode("latin-1")}
    response = httpx.get(f"{url}/v1/models", headers=headers)
    assert response.status_code == 200
    assert GENERATED_ID.fullmatch(response.headers["x-request-id"])
    assert "GET /v1/models 200 total=" in log_line(url, response.headers["x-request-id"])


def test_an_id_of_128_visible_characters_is_kept(url):
    given = "!~" + "a" * 126
    assert httpx.get(f"{url}/v1/models", headers={**AUTH, "X-Request-Id": given}).headers["x-request-id"] == given


def test_refusals_carry_the_request_id(url):
    """401 and 413 here; 503 and 408 come from the same admission middleware, inside the one that sets the id."""
    unauthorized = httpx.get(f"{url}/v1/models", headers={"X-Request-Id": "no-key"})
    assert_error(unauthorized, 401)
    too_large = httpx.post(f"{url}/v1/completions", headers={**AUTH, "X-Request-Id": "big-body"},
                           json={"model": MODEL, "prompt": "x" * 20_000})
    assert_error(too_large, 413, "request_too_large")
    assert (unauthorized.headers["x-request-id"], too_large.headers["x-request-id"]) == ("no-key", "big-body")
    assert "POST /v1/completions 413 total=" in log_line(url, "big-body")


def test_probes_answer_with_an_id_and_are_not_logged(url):
    response = httpx.get(f"{url}/health")
    assert response.status_code == 200 and GENERATED_ID.fullmatch(response.headers["x-request-id"])
    assert response.headers["x-request-id"] not in server_log(url)


def test_the_model_card_says_how_long_a_prompt_may_be(url, client, checkpoint):
    card = httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"][0]
    assert card["max_model_len"] == MAX_MODEL_LEN
    assert (card["id"], card["owned_by"], card["root"], card["parent"]) == (MODEL, "nanoserve", str(checkpoint), None)
    assert httpx.get(f"{url}/v1/models/{MODEL}", headers=AUTH).json()["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve(MODEL).model_extra["max_model_len"] == MAX_MODEL_LEN
    tokenized = httpx.post(f"{url}/tokenize", headers=AUTH, json={"prompt": "Hi"}).json()
    assert tokenized["max_model_len"] == MAX_MODEL_LEN  # the engine's own value, which /tokenize reports


@pytest.mark.parametrize("value", ["https://a.example", '{"origin": "*"}', '["*", 3]', "[*]"])
def test_a_cors_flag_that_is_not_a_json_list_of_strings_stops_the_start(value, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--allowed-origins", value])
    assert stopped.value.code == 2
    assert "--allowed-origins: not a JSON list of strings" in capsys.readouterr().err
