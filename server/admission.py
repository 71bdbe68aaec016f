"""The door every API request passes (an ASGI middleware): refused with 503 unless the server is ready
(loading, draining, engine gone), refused with 413 when the body is over the limit, counted while in
flight so that a drain knows when it is done, and counted by status when the answer is an error."""
from collections.abc import Awaitable, Callable

from server.errors import ApiError, error_response
from server.lifecycle import Lifecycle
from server.metrics import Metrics

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # always answered: probes and scrapes


class Admission:
    def __init__(self, app, lifecycle: Lifecycle, metrics: Metrics, max_body_bytes: int):
        self.app, self.lifecycle, self.metrics, self.max_body_bytes = app, lifecycle, metrics, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)

        async def send_counting_errors(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.errors.labels(status=str(message["status"])).inc()
            await send(message)

        if not self.lifecycle.accepting:
            return await self._refuse_unready(scope, receive, send_counting_errors)
        self.lifecycle.in_flight += 1  # from here on, a drain waits for this request
        try:
            body = await self._read_body(scope, receive)
            if body is None:
                limit = self.max_body_bytes
                await _refuse(413, f"the request body is over the limit of {limit} bytes ({limit / 2**20:g} MiB)",
                              "request_too_large", scope, receive, send_counting_errors)
            elif not self.lifecycle.accepting:  # the server began draining while the body arrived
                await self._refuse_unready(scope, receive, send_counting_errors)
            else:
                await self.app(scope, _replay(body, receive), send_counting_errors)
        except Exception:
            self.metrics.errors.labels(status="500").inc()  # answered by the outermost handler, past this one
            raise
        finally:
            self.lifecycle.in_flight -= 1

    async def _refuse_unready(self, scope, receive, send) -> None:
        await _refuse(503, self.lifecycle.phase.value, "service_unavailable", scope, receive, send)

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None as soon as it is known to be over the limit."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left; the app will see it too
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            more = message.get("more_body", False)
        return b"".join(chunks)


def _replay(body: bytes, receive) -> Callable[[], Awaitable[dict]]:
    """A `receive` that hands the app the body already read, then whatever comes next (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again() -> dict:
        return pending.pop() if pending else await receive()
    return receive_again


async def _refuse(status: int, message: str, code: str, scope, receive, send) -> None:
    await error_response(ApiError(status, message, code))(scope, receive, send)
