"""Bearer API keys, compared in constant time."""
import hmac

from fastapi import Request

from server.errors import ApiError


def require_key(keys: tuple[str, ...]):
    """A FastAPI dependency: with keys configured, a request must carry one of them."""
    async def check(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        valid = [hmac.compare_digest(token.encode(), key.encode()) for key in keys]  # every key, no early exit
        if scheme.lower() != "bearer" or not any(valid):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
    return check
