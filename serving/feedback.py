"""Credentials and limits: stateless feedback tokens, API keys, per-key token buckets, LRU stores.

A feedback token is an itsdangerous-signed (HMAC-SHA256) record of everything feedback needs: the
response id, the user and tenant it was given to, its conversation, the adapter version that
answered, and an expiry. Any replica holding the secret accepts it after any restart, so no record
of issued responses is needed. Rotation: several secrets are accepted, the first one signs; drop a
secret from the list to retire the tokens it signed.

API keys are held as sha256 digests only and compared with hmac.compare_digest.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from itsdangerous import BadData, URLSafeSerializer

# What URLSafeSerializer emits (base64url payload, "." separators, an optional "." zlib marker):
# anything else is refused before any decoding, so no parser ever sees non-ASCII input.
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-.]{1,2048}")
_SALT = "flywheel.feedback-token.v2"


class TokenError(ValueError):
    """A feedback token that is malformed, forged or expired; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FeedbackClaims:
    """What a verified token says about the response it was issued with."""

    response_id: str
    user_id: str
    conversation_id: str
    adapter_version: str | None
    expires: int
    tenant: str | None = None


class FeedbackTokens:
    """Issue and verify feedback tokens; `secrets[0]` signs, every secret in the list verifies."""

    def __init__(self, secrets: list[bytes]):
        if not secrets or any(not s for s in secrets):
            raise ValueError("feedback tokens need at least one non-empty secret")
        # itsdangerous signs with the *last* key of its list and tries all of them to verify.
        self._serializer = URLSafeSerializer(list(reversed(secrets)), salt=_SALT,
                                             signer_kwargs={"digest_method": hashlib.sha256})

    def issue(self, c: FeedbackClaims) -> str:
        return self._serializer.dumps({"r": c.response_id, "u": c.user_id, "c": c.conversation_id,
                                       "a": c.adapter_version, "e": c.expires, "t": c.tenant})

    def verify(self, token: str, now: float | None = None) -> FeedbackClaims:
        """The token's claims, or TokenError: 401 malformed or not signed by an accepted secret, 410 expired."""
        if not isinstance(token, str) or not _TOKEN_CHARS.fullmatch(token):
            raise TokenError(401, "feedback_token is malformed; send the feedback_token returned with the response")
        try:
            p = self._serializer.loads(token)
        except BadData:
            raise TokenError(401, "feedback_token is not valid: it was not issued by this service, was altered, "
                                  "or was signed with a retired secret") from None
        claims = _claims(p)
        if claims is None:  # signed by us but not a token layout we know (e.g. from a future version)
            raise TokenError(401, "feedback_token has an unknown layout; send the feedback_token returned with "
                                  "the response")
        if (time.time() if now is None else now) > claims.expires:
            raise TokenError(410, f"feedback_token expired at {claims.expires} (unix time); feedback for this "
                                  f"response is no longer accepted")
        return claims


def _claims(p: object) -> FeedbackClaims | None:
    if not isinstance(p, dict):
        return None
    r, u, c, a, e, t = (p.get(k) for k in ("r", "u", "c", "a", "e", "t"))
    if not (isinstance(r, str) and isinstance(u, str) and isinstance(c, str) and type(e) is int
            and (a is None or isinstance(a, str)) and (t is None or isinstance(t, str))):
        return None
    return FeedbackClaims(r, u, c, a, e, t)


class ApiKeys:
    """Bearer API keys, each naming a tenant (the calling app). Only sha256 digests are kept.

    Entries are `key:tenant`, or `sha256-<64 hex digits>:tenant` so that a config file never needs
    to hold the key itself. No entries = the API is open (tenant None).
    """

    def __init__(self, entries: list[str]):
        self._digests: list[tuple[bytes, str]] = []
        for entry in entries:
            key, sep, tenant = entry.strip().rpartition(":")
            if not sep or not key or not tenant:
                raise ValueError("an API key entry must look like 'key:tenant' (or 'sha256-<hex>:tenant'); "
                                 f"got one with {len(entry)} characters that does not")
            m = re.fullmatch(r"sha256-([0-9a-f]{64})", key)
            digest = bytes.fromhex(m.group(1)) if m else hashlib.sha256(key.encode()).digest()
            self._digests.append((digest, tenant))

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def tenant(self, presented: str) -> str | None:
        """The tenant of a presented key, or None. Every stored digest is compared (no early exit)."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for stored, tenant in self._digests:
            if hmac.compare_digest(stored, digest):
                found = tenant
        return found


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

    def discard(self, key, value) -> None:  # noqa: ANN001
        """Remove `key` if it still maps to this very `value`."""
        with self._lock:
            if self._d.get(key) is value:
                del self._d[key]

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

    def _level(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def allow(self, key: str, now: float | None = None) -> bool:
        """Take one token if there is one."""
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens = self._level(key, now)
            ok = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
            self._buckets.move_to_end(key)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return ok

    def has_room(self, key: str, now: float | None = None) -> bool:
        """Whether `allow` would pass now, without taking a token (to refuse before costly work)."""
        if self.rate <= 0:
            return True
        with self._lock:
            return self._level(key, time.monotonic() if now is None else now) >= 1.0
