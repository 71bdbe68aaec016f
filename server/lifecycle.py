"""The process's life. The model loads in a background thread while /health and /ready say 503; then the server
is ready. The first SIGTERM (or SIGINT) drains: /ready and new requests get 503 at once, as do requests whose bodies
are still arriving, requests in flight get `drain_timeout` seconds to finish (then they end with an error), and the
process exits 0; while the model still loads, it exits 0 at once. A second signal exits at once. If loading fails,
the engine loop dies, or one engine step runs longer than `engine_stall_timeout` (a hung device or kernel), the
process exits 1 so that the orchestrator restarts it."""
import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from enum import Enum

import uvicorn

from server.config import ServerConfig
from server.errors import ApiError
from server.serving import Served

log = logging.getLogger(__name__)


class Phase(Enum):  # each value is what a refused request is told
    LOADING = "the model is still loading; retry shortly"
    READY = "ready"
    DRAINING = "the server is shutting down"
    FAILED = "the engine has stopped; the server is restarting"


class Lifecycle:
    def __init__(self, config: ServerConfig, load: Callable[[], Served]):
        self.config, self._load = config, load
        self.phase = Phase.LOADING
        self.served: Served | None = None
        self.in_flight = 0  # API requests admitted and not yet answered in full
        self.exit_code = 0
        self.signalled = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: Callable[[], None] = lambda: None  # tells the HTTP server to shut down
        self._tasks: set[asyncio.Task] = set()
        self.drain_started = asyncio.Event()  # wakes the requests whose bodies are still arriving, to refuse them
        self._loader: threading.Thread | None = None

    @property
    def accepting(self) -> bool:
        return self.phase is Phase.READY

    @property
    def healthy(self) -> bool:
        """Liveness, as vLLM, TGI and llama.cpp answer /health: the model is loaded and the engine loop runs, draining
        included (a hung engine turns the phase FAILED)."""
        return self.phase in (Phase.READY, Phase.DRAINING) and self.served is not None and self.served.engine.alive

    def refusal(self, headers: dict[str, str] | None = None) -> ApiError:
        """The 503 for a request or probe the server cannot answer now, saying why."""
        phase = Phase.FAILED if self.phase is Phase.READY else self.phase  # ready, yet refused: the engine just died
        code = "server_shutdown" if phase is Phase.DRAINING else "service_unavailable"
        return ApiError(503, phase.value, code, headers=headers)

    def start(self) -> None:
        """Begin loading (called once the event loop runs); the server answers meanwhile."""
        self.loop = asyncio.get_running_loop()
        loaded: Future = Future()

        def load() -> None:
            try:
                served, error = self._load(), None
            except BaseException as exc:  # noqa: BLE001 - reported by _boot
                served, error = None, exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
            if loaded.cancelled():  # the server stopped while this loaded
                return
            if error:
                loaded.set_exception(error)
            else:
                loaded.set_result(served)
        self._loader = threading.Thread(target=load, name="model-loader", daemon=True)
        self._loader.start()
        self._spawn(self._boot(loaded))

    @property
    def loading(self) -> bool:
        """Whether the model is still loading: its thread may be inside torch's C++ code, which aborts the process
        (SIGABRT) when the interpreter exits around it."""
        return self._loader is not None and self._loader.is_alive()

    def shutdown(self) -> None:
        """Last, once the HTTP server has stopped: stop the engine thread cleanly."""
        if self.served is not None:
            self.served.engine.stop()

    async def _boot(self, loaded: Future) -> None:
        try:
            self.served = await asyncio.wrap_future(loaded)
        except Exception:
            log.exception("loading the model failed")
            return self._exit(1, Phase.FAILED)
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY
            log.info("ready to serve %s", self.config.model_name)
        stalled = await self._engine_stalled()
        self.phase, self.exit_code = Phase.FAILED, 1  # /health and new requests get 503
        if stalled:  # nothing else will answer the requests in flight
            self.served.stop_all(ApiError(500, "the engine hung; the server is restarting", "engine_dead"))
        # A moment for the requests in flight to write their errors and for health checks to see 503 (not a
        # refused connection), then exit.
        await asyncio.sleep(1.0)
        await self._settled(5.0)
        if stalled:
            # The engine thread is stuck inside a step: it cannot be joined, and an interpreter that exits around it
            # can hang or abort. Nothing is left to flush: the log's handlers flush each record.
            os._exit(1)
        self._exit(1, Phase.FAILED)

    async def _engine_stalled(self) -> bool:
        """Watch the engine until its loop dies (False) or one step runs longer than the stall timeout (True)."""
        engine, timeout = self.served.engine, self.config.engine_stall_timeout
        died = asyncio.wrap_future(engine.died)
        while not died.done():
            await asyncio.wait({died}, timeout=min(1.0, timeout / 4))
            if not died.done() and (running := engine.step_running_for()) > timeout:
                log.error("an engine step has run for %.1f s, longer than the engine stall timeout (%g s): the engine "
                          "is hung; exiting so that the process is restarted", running, timeout)
                return True
        log.error("the engine loop died (%r); exiting so that the process is restarted", died.result())
        return False

    def on_signal(self, sig: int) -> None:
        """First signal: drain. Second: exit now. Runs in the main thread, as signal handlers do."""
        if self.signalled:
            log.warning("second signal: exiting at once")
            os._exit(128 + sig)
        self.signalled = True
        if self.loop is None:
            return self._exit(0, Phase.DRAINING)
        self.loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        if self.phase is Phase.FAILED:
            return  # already on its way out, with exit code 1
        if self.served is None or self.phase is not Phase.READY:
            return self._exit(0, Phase.DRAINING)
        self.phase = Phase.DRAINING
        self.drain_started.set()
        log.info("draining: %d requests in flight get %g s to finish", self.in_flight, self.config.drain_timeout)
        self._spawn(self._drain())

    async def _drain(self) -> None:
        if not await self._settled(self.config.drain_timeout):
            log.warning("drain timeout: ending %d requests", self.in_flight)
            self.served.stop_all(ApiError(503, "the server shut down before this request finished",
                                          "server_shutdown"))
            await self._settled(5.0)
        self._exit(0, Phase.DRAINING)

    async def _settled(self, seconds: float) -> bool:
        """Whether every request in flight finished within `seconds`."""
        deadline = self.loop.time() + seconds
        while self.in_flight and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        return not self.in_flight

    def _exit(self, code: int, phase: Phase) -> None:
        if self.phase is not Phase.FAILED:
            self.phase = phase
        self.exit_code = self.exit_code or code
        self.stop()

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)  # held, so that it is not collected while it runs
        task.add_done_callback(self._tasks.discard)


class Server(uvicorn.Server):
    """uvicorn, except that signals go to the life cycle: a drain, not a closed socket."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle):
        super().__init__(config)
        self.lifecycle = lifecycle
        lifecycle.stop = self._stop

    def _stop(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame) -> None:
        self.lifecycle.on_signal(sig)
