"""Feedback tokens, the record of issued responses, per-user rate limits and idempotency keys.

A feedback token is `<expiry unix seconds>.<hex HMAC-SHA256(secret, response_id | user_id | expiry)>`:
it proves that this server issued `response_id` to `user_id` and until when feedback is accepted,
without a database lookup. The response record (conversation id, adapter version, owner) is kept
in memory for the token lifetime, bounded by `max_responses` (oldest evicted first).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


class TokenError(ValueError):
    """A feedback token that is malformed, forged or expired; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def sign(secret: bytes, response_id: str, user_id: str, expires: int) -> str:
    msg = f"{response_id}|{user_id}|{expires}".encode()
    return f"{expires}.{hmac.new(secret, msg, hashlib.sha256).hexdigest()}"


def verify(secret: bytes, token: str, response_id: str, user_id: str, now: float | None = None) -> int:
    """Return the token's expiry, or raise TokenError (401 forged/malformed, 410 expired)."""
    exp_s, _, mac = token.partition(".")
    if not exp_s.isdigit() or len(mac) != 64:
        raise TokenError(401, "feedback_token is malformed; use the feedback_token returned with the response")
    expires = int(exp_s)
    expected = sign(secret, response_id, user_id, expires)
    if not hmac.compare_digest(expected, token):
        raise TokenError(401, "feedback_token does not match this response_id and user; it was not issued "
                              "by this server for them")
    if (now if now is not None else time.time()) > expires:
        raise TokenError(410, f"feedback_token expired at {expires} (unix time); feedback for this "
                              f"response is no longer accepted")
    return expires


@dataclass(frozen=True)
class IssuedResponse:
    response_id: str
    user_id: str
    conversation_id: str
    adapter_version: str | None
    expires: int


class LRU:
    """A thread-safe bounded mapping, oldest entry evicted first."""

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):  # noqa: ANN001, ANN201
        with self._lock:
            return self._d.get(key)

    def put(self, key, value) -> None:  # noqa: ANN001
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.max_items:
                self._d.popitem(last=False)

    def setdefault(self, key, value):  # noqa: ANN001, ANN201
        """Insert unless present; returns the value now stored (atomic: for idempotency keys)."""
        with self._lock:
            if key in self._d:
                return self._d[key]
            self._d[key] = value
            while len(self._d) > self.max_items:
                self._d.popitem(last=False)
            return value

    def __len__(self) -> int:
        return len(self._d)


class RateLimiter:
    """Token bucket per key: `per_minute` sustained, `burst` at once. 0 disables it."""

    def __init__(self, per_minute: float, burst: int, max_keys: int = 100_000):
        self.rate = per_minute / 60.0
        self.burst = float(max(burst, 1))
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_keys = max_keys

    def allow(self, key: str, now: float | None = None) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            ok = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
            self._buckets.move_to_end(key)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return ok
