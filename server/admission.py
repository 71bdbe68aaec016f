"""The door every API request passes (an ASGI middleware): refused with 401 without a valid API key (when keys are
configured; checked first, so that a caller without one learns nothing more), with 503 unless the server is ready
(loading, draining, engine gone), with 413 when the body is over the limit and with 408 when it takes longer than
`request_body_timeout` to arrive; counted while in flight so that a drain knows when it is done, and counted by
status when the answer is an error. It leaves the digest of the request's API key (None without keys) in
`request.state.api_key_digest`, with which the routes salt the prefix cache per tenant."""
import asyncio
from collections.abc import Awaitable, Callable

from server.auth import key_digest, matching_key
from server.errors import ApiError, error_response
from server.lifecycle import Lifecycle
from server.metrics import Metrics

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # always answered, without a key: probes and scrapes
CLOSE = {"Connection": "close"}  # after a refusal that leaves the body half read, the connection carries no more


class Admission:
    def __init__(self, app, lifecycle: Lifecycle, metrics: Metrics, max_body_bytes: int, api_keys: tuple[str, ...]):
        self.app, self.lifecycle, self.metrics = app, lifecycle, metrics
        self.max_body_bytes, self.api_keys = max_body_bytes, api_keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)

        async def send_counting_errors(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.errors.labels(status=str(message["status"])).inc()
            await send(message)

        if not self._authenticate(scope):
            unauthorized = ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                    "invalid_api_key")
            return await error_response(unauthorized)(scope, receive, send_counting_errors)
        if not self.lifecycle.accepting:
            return await error_response(self.lifecycle.refusal())(scope, receive, send_counting_errors)
        self.lifecycle.in_flight += 1  # from here on, a drain waits for this request
        try:
            await self._admit(scope, receive, send_counting_errors)
        except Exception:
            self.metrics.errors.labels(status="500").inc()  # answered by the outermost handler, past this one
            raise
        finally:
            self.lifecycle.in_flight -= 1

    def _authenticate(self, scope) -> bool:
        """Whether the request may pass: no keys are configured, or it names one (whose digest it then carries)."""
        key = None
        if self.api_keys:
            key = matching_key(dict(scope["headers"]).get(b"authorization", b""), self.api_keys)
            if key is None:
                return False
        scope.setdefault("state", {})["api_key_digest"] = None if key is None else key_digest(key)
        return True

    async def _admit(self, scope, receive, send) -> None:
        """The app, once the whole body has arrived; or a refusal."""
        try:
            body = await self._receive_body(scope, receive)
        except ApiError as refusal:
            return await error_response(refusal)(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)

    async def _receive_body(self, scope, receive) -> bytes:
        """The whole body, raced against the body timeout and the drain. A request whose body is still arriving has
        started no work, so either ends it at once: a slow client holds neither a connection nor the drain for long."""
        timeout = self.lifecycle.config.request_body_timeout
        reading = asyncio.ensure_future(self._read_body(scope, receive))
        draining = asyncio.ensure_future(self.lifecycle.drain_started.wait())
        try:
            done, _ = await asyncio.wait({reading, draining}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reading.cancel()
            draining.cancel()
        if reading not in done:
            if draining in done:
                raise self.lifecycle.refusal(CLOSE)
            raise ApiError(408, f"the request body did not arrive in full within {timeout:g} s", "request_timeout",
                           headers=CLOSE)
        body = reading.result()
        if not self.lifecycle.accepting:  # the server began draining (or failed) as the last bytes arrived
            raise self.lifecycle.refusal()
        return body

    async def _read_body(self, scope, receive) -> bytes:
        """The whole body; a 413 as soon as it is known to be over the limit."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left; the app will see it too
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                raise self._too_large()
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _too_large(self) -> ApiError:
        limit = self.max_body_bytes
        return ApiError(413, f"the request body is over the limit of {limit} bytes ({limit / 2**20:g} MiB)",
                        "request_too_large")


def _replay(body: bytes, receive) -> Callable[[], Awaitable[dict]]:
    """A `receive` that hands the app the body already read, then whatever comes next (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again() -> dict:
        return pending.pop() if pending else await receive()
    return receive_again
