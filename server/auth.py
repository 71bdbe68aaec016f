"""Bearer API keys, compared in constant time."""
import hmac


def key_is_valid(authorization: bytes, keys: tuple[str, ...]) -> bool:
    """Whether an `Authorization` header's value is `Bearer <one of the keys>`."""
    scheme, _, token = authorization.partition(b" ")
    valid = [hmac.compare_digest(token, key.encode()) for key in keys]  # every key, no early exit
    return scheme.lower() == b"bearer" and any(valid)
