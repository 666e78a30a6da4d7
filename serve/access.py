"""API keys for the HTTP service: who may ask, and how often.

With keys configured, every route but ``/healthz`` and the web page (``/``, which asks for the key and
sends it) needs ``Authorization: Bearer KEY``; a request
without one, or with a key that is not configured, gets 401. Keys come from the environment
variable ``LOOKALIKE_API_KEYS`` (comma-separated; e.g. from a Kubernetes Secret) and/or a file named
by the service's ``api_keys_file`` (one key per line, ``#`` comments): never from the repository,
never from the config itself. Only their SHA-256 digests are kept, and a presented key is compared
with each in constant time (``hmac.compare_digest``), so the answer's timing does not tell how much
of a key was right.

An optional rate limit per key (``key_rate_per_s`` with ``key_burst``) is a token bucket per key and
ingress replica: past it the answer is 429 with ``Retry-After`` (whole seconds until a request
fits). With several ingress replicas a key's limit applies in each of them.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

#: The environment variable read for keys (comma-separated).
KEYS_ENV = "LOOKALIKE_API_KEYS"
#: The shortest key accepted: shorter ones are guessable.
MIN_KEY_CHARS = 16


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_keys(path: str | None, env: dict[str, str] | None = None) -> list[str]:
    """The configured keys: ``LOOKALIKE_API_KEYS`` (comma-separated) and the lines of ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a key shorter than MIN_KEY_CHARS characters or with whitespace inside.
    """
    env = os.environ if env is None else env
    keys = [k.strip() for k in env.get(KEYS_ENV, "").split(",") if k.strip()]
    if path:
        for line in Path(path).expanduser().read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(line)
    for key in keys:
        if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
            raise ValueError(f"an API key must have at least {MIN_KEY_CHARS} characters and no spaces "
                             f"(one of {len(keys)} does not; e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return keys


@dataclass
class _Bucket:
    tokens: float
    at: float


class KeyCheck:
    """Checks a request's ``Authorization`` header against the configured keys and rate limit.

    Args:
        keys: the accepted keys (empty: no check, every request passes).
        rate_per_s: requests a second each key may make (0: no limit).
        burst: requests a key may make at once above its rate (at least 1).
        clock: the time source (seconds; tests pass their own).
    """

    def __init__(self, keys: list[str], rate_per_s: float = 0.0, burst: int = 1, clock=time.monotonic) -> None:
        if rate_per_s < 0 or burst < 1:
            raise ValueError(f"key_rate_per_s must be >= 0 and key_burst >= 1, got {rate_per_s} and {burst}")
        self.digests = [_digest(k) for k in dict.fromkeys(keys)]
        self.rate, self.burst, self.clock = float(rate_per_s), int(burst), clock
        self.buckets: dict[bytes, _Bucket] = {}
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def check(self, authorization: str | None) -> tuple[int, str, dict[str, str]] | None:
        """None when the request may go on; else (status, reason, headers) of the refusal, the
        reason one of ``missing``, ``wrong``, ``rate``."""
        if not self.enabled:
            return None
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return 401, "missing", {"WWW-Authenticate": 'Bearer realm="lookalike"'}
        digest = _digest(presented.strip())
        matched = None
        for known in self.digests:  # every digest compared: the time does not depend on which matched
            if hmac.compare_digest(digest, known):
                matched = known
        if matched is None:
            return 401, "wrong", {"WWW-Authenticate": 'Bearer realm="lookalike", error="invalid_token"'}
        wait = self._take(matched)
        if wait > 0:
            return 429, "rate", {"Retry-After": str(max(1, math.ceil(wait)))}
        return None

    def _take(self, key: bytes) -> float:
        """Takes one request from the key's bucket; returns 0, or the seconds until one fits."""
        if self.rate <= 0:
            return 0.0
        with self.lock:
            now = self.clock()
            bucket = self.buckets.setdefault(key, _Bucket(float(self.burst), now))
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate


#: What the HTTP middleware of this process needs from its ingress replica (one replica a process):
#: its key check (None: no keys) and its metrics. Kept here, in an imported module, because Serve
#: ships the deployment class by value: a module-level name of ``serve.app`` read from the class's
#: methods would be their own copy, not the one the middleware (imported) reads.
_CURRENT: dict = {}


def set_current(keys: "KeyCheck | None", metrics) -> None:
    """Called by the ingress replica once it is set up."""
    _CURRENT.update(keys=keys, metrics=metrics)


def current() -> tuple["KeyCheck | None", object]:
    """The ingress replica's key check and metrics (None, None before it is set up)."""
    return _CURRENT.get("keys"), _CURRENT.get("metrics")
