"""The engine thread's failure path, with a stand-in engine (narrow unit test)."""
import asyncio
import threading
import time
from concurrent.futures import Future

import pytest

from engine.async_engine import AsyncLLMEngine, EngineDeadError
from engine.params import SamplingParams


class _BreaksOnStep:
    """Accepts requests, then fails on its first step."""

    def __init__(self):
        self.pending = False

    def add_request(self, prompt, params, request_id, cache_salt=None):
        self.pending = True
        return request_id

    def has_unfinished_requests(self):
        return self.pending

    def step(self):
        raise RuntimeError("boom")

    def abort(self, request_id):
        pass

    def on_failure(self, callback):
        pass  # a single process: no rank to lose


def test_in_flight_requests_hear_of_a_dead_loop_and_new_ones_are_refused():
    engine = AsyncLLMEngine(_BreaksOnStep())

    async def consume():
        return [out async for out in engine.generate([1, 2], SamplingParams())]
    with pytest.raises(EngineDeadError, match="boom"):
        asyncio.run(consume())
    deadline = time.time() + 5
    while engine.alive and time.time() < deadline:
        time.sleep(0.01)
    assert not engine.alive
    with pytest.raises(EngineDeadError):
        asyncio.run(consume())


class _RefusesEverything(_BreaksOnStep):
    def add_request(self, prompt, params, request_id, cache_salt=None):
        raise ValueError("refused")


def test_a_request_whose_caller_left_before_it_was_added_is_skipped():
    """Found by fuzzing: the caller cancels while the add is queued (another prompt of the same HTTP request
    failed); the loop must not die setting a result on the cancelled future."""
    engine = AsyncLLMEngine(_RefusesEverything())
    added = Future()
    added.cancel()
    engine._handle(("add", "r1", ([1], SamplingParams(), None, added)))
    assert engine.alive and added.cancelled()


def test_a_request_still_queued_when_the_loop_dies_hears_of_it():
    """An add that reaches the inbox while the failing step runs is answered, not left waiting forever."""
    late, engine_ready = Future(), threading.Event()

    class _DiesWithAnAddQueued(_BreaksOnStep):
        def has_unfinished_requests(self):
            return True

        def step(self):
            engine_ready.wait(5)
            engine._inbox.put(("add", "late", ([1], SamplingParams(), None, late)))
            raise RuntimeError("boom")
    engine = AsyncLLMEngine(_DiesWithAnAddQueued())
    engine_ready.set()
    assert isinstance(late.exception(timeout=5), EngineDeadError)


class _RunsForever(_BreaksOnStep):
    """Accepts requests and steps without ever finishing one."""

    def __init__(self):
        super().__init__()
        self.aborted = []

    def step(self):
        time.sleep(0.001)
        return []

    def abort(self, request_id):
        self.aborted.append(request_id)


def test_a_reused_request_id_is_refused_and_leaves_the_first_request_running():
    inner = _RunsForever()
    engine = AsyncLLMEngine(inner)

    async def main():
        first = engine.generate([1], SamplingParams(), "same")
        waiting = asyncio.ensure_future(first.__anext__())
        await asyncio.sleep(0.05)
        with pytest.raises(ValueError, match="already in use"):
            await engine.generate([2], SamplingParams(), "same").__anext__()
        assert not waiting.done() and inner.aborted == []
        engine.stop()  # which ends the first request's stream
        with pytest.raises(EngineDeadError, match="stopped"):
            await asyncio.wait_for(waiting, 5)
    asyncio.run(main())
