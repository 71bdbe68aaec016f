"""The process's life. The model loads in a background thread while /health answers and /ready says 503;
then the server is ready. The first SIGTERM (or SIGINT) drains: /ready and new requests get 503 at once, as do
requests whose bodies are still arriving, requests in flight get `drain_timeout` seconds to finish (then they
end with an error), and the process exits 0. A second signal exits at once. If loading fails or the engine
loop dies, the process exits 1 so that the orchestrator restarts it."""
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

    @property
    def accepting(self) -> bool:
        return self.phase is Phase.READY

    @property
    def alive(self) -> bool:
        """Liveness: loading, or the engine loop is running."""
        return self.served.engine.alive if self.served else self.phase is not Phase.FAILED

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
        threading.Thread(target=load, name="model-loader", daemon=True).start()
        self._spawn(self._boot(loaded))

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
        error = await asyncio.wrap_future(self.served.engine.died)
        log.error("the engine loop died (%r); exiting so that the process is restarted", error)
        self.phase, self.exit_code = Phase.FAILED, 1
        # A moment for the requests in flight to write their errors and for health checks to see 503 (not a
        # refused connection), then exit.
        await asyncio.sleep(1.0)
        await self._settled(5.0)
        self._exit(1, Phase.FAILED)

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
