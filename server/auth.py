"""Bearer API keys, compared in constant time."""
import hashlib
import hmac


def matching_key(authorization: bytes, keys: tuple[str, ...]) -> str | None:
    """The key an `Authorization` header's value `Bearer <key>` names, or None when it names none of `keys`."""
    scheme, _, token = authorization.partition(b" ")
    valid = [hmac.compare_digest(token, key.encode()) for key in keys]  # every key, no early exit
    return keys[valid.index(True)] if scheme.lower() == b"bearer" and any(valid) else None


def key_digest(key: str) -> str:
    """What the server keeps of a key beyond the check: its SHA-256, which names the tenant (the prefix cache's
    salt) and cannot be turned back into the key."""
    return hashlib.sha256(key.encode()).hexdigest()
