"""An error after a stream started reaches the client in-band, then [DONE]."""
import asyncio
import json

from server.errors import ApiError
from server.metrics import Metrics
from server.exchange import Exchange


class _Served:
    model_name = "m"
    metrics = Metrics()


async def _failing_runs():
    raise ApiError(400, "the engine refused it", "bad")
    yield  # an async generator that fails before its first output


def test_error_event_then_done():
    async def collect():
        return [event async for event in Exchange(_Served(), chat_style=True).stream(_failing_runs(), 1, False)]
    events = asyncio.run(collect())
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert json.loads(events[1].removeprefix("data: ")) == {
        "error": {"message": "the engine refused it", "type": "invalid_request_error", "param": None, "code": "bad"}}
    assert events[2] == "data: [DONE]\n\n"
