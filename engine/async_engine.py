"""The engine loop in one background thread, with an asyncio face for the server.

The thread owns the `LLMEngine`: requests and aborts reach it as messages, and each step's outputs go
back to the waiting coroutines through `loop.call_soon_threadsafe`. Cancelling a consumer (a client
that went away) aborts its request, whose blocks are then freed within a step.
"""
import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future

from engine.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; no request can be served any more."""


class RequestFailedError(RuntimeError):
    """This request failed inside the engine (finish_reason "error"); the others go on."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.error: BaseException | None = None
        self.died: Future = Future()  # resolved with the error once the loop has stopped
        self._running = True
        self._step_started: float | None = None  # monotonic time the step in progress began; None between steps
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()
        engine.on_failure(self._lost_a_rank)

    def _lost_a_rank(self, error: Exception) -> None:
        """A tensor-parallel rank died: no step can run. Unhealthy at once; the loop stops at its next message, even
        while idle (a step in progress fails by itself)."""
        self.error = self.error or error
        self._inbox.put(("fail", None, error))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def step_running_for(self) -> float:
        """Seconds the step in progress has run (0 between steps): what tells a hung engine from a busy one."""
        started = self._step_started  # read once: the loop thread clears it when the step ends
        return 0.0 if started is None else time.monotonic() - started

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop between two steps (requests still running are dropped) and wait for it: a thread
        killed inside a kernel at interpreter exit aborts the process."""
        self._inbox.put(("stop", None, None))
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while self._running:
                block = not self.engine.has_unfinished_requests()
                self._handle(self._inbox.get(block=block) if block else None)
                while not self._inbox.empty():
                    self._handle(self._inbox.get_nowait())
                self._step_started = time.monotonic()
                outputs = self.engine.step()
                self._step_started = None
                for output in outputs:
                    self._deliver(output.request_id, output)
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
            log.exception("engine loop died")
            self.error = exc
            self._fail_waiters(EngineDeadError(f"the engine stopped: {exc}"))
            self.died.set_result(exc)
        else:
            self._fail_waiters(EngineDeadError("the engine was stopped"))

    def _fail_waiters(self, error: EngineDeadError) -> None:
        """End every stream and every add still queued with `error`: nothing else will answer them."""
        for request_id in list(self._streams):
            self._deliver(request_id, error)
        while not self._inbox.empty():
            kind, _, payload = self._inbox.get_nowait()
            if kind == "add" and payload[-1].set_running_or_notify_cancel():
                payload[-1].set_exception(error)

    def _handle(self, message) -> None:
        if message is None:
            return
        kind, request_id, payload = message
        if kind == "fail":
            raise payload
        if kind == "stop":
            self._running = False
            return
        if kind == "abort":
            self.engine.abort(request_id)
            return
        prompt, params, cache_salt, future = payload
        if not future.set_running_or_notify_cancel():
            return  # the caller left before the request was added; nothing to undo
        try:
            future.set_result(self.engine.add_request(prompt, params, request_id, cache_salt))
        except Exception as exc:  # noqa: BLE001 - handed to the caller, who maps it to a 400
            future.set_exception(exc)

    def _deliver(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)  # one lookup: the consumer may remove it meanwhile
        if entry is not None:
            loop, stream = entry
            loop.call_soon_threadsafe(stream.put_nowait, item)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it runs; raises ValueError at once if the request cannot run. Requests share
        cached prompt blocks only with requests of the same `cache_salt`."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:  # before its stream replaced the running request's
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        added: Future = Future()
        self._inbox.put(("add", request_id, (prompt, params, cache_salt, added)))
        if self.error is not None:  # the loop died before it could see this request
            del self._streams[request_id]
            raise EngineDeadError(f"the engine stopped: {self.error}")
        finished = False
        try:
            await asyncio.wrap_future(added)
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                if finished and any(c.finish_reason == "error" for c in item.outputs):
                    raise RequestFailedError(f"the request failed in the engine (see the server's log): {request_id}")
                yield item
        finally:
            del self._streams[request_id]
            if not finished:  # cancelled, disconnected or failed: free what the request holds
                self._inbox.put(("abort", request_id, None))
