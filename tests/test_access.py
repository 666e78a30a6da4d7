"""API keys (serve.access) without a service: where keys come from, the check, the rate limit."""

from __future__ import annotations

import hmac

import pytest

from serve import access
from serve.access import KEYS_ENV, KeyCheck, read_keys

KEY_A, KEY_B = "a" * 16 + "-first-key", "b" * 16 + "-second-key"


def test_keys_come_from_the_environment_and_a_file(tmp_path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# operators' keys\n{KEY_A}\n\n{KEY_B}   # the shop\n")
    assert read_keys(str(path), env={}) == [KEY_A, KEY_B]
    assert read_keys(None, env={KEYS_ENV: f" {KEY_B} ,{KEY_A},"}) == [KEY_B, KEY_A]
    assert read_keys(str(path), env={KEYS_ENV: KEY_B}) == [KEY_B, KEY_A, KEY_B]
    assert read_keys(None, env={}) == []
    with pytest.raises(ValueError, match="at least 16 characters"):
        read_keys(None, env={KEYS_ENV: "short"})
    with pytest.raises(FileNotFoundError):
        read_keys(str(tmp_path / "missing"), env={})


def test_no_keys_lets_everything_through() -> None:
    check = KeyCheck([])
    assert not check.enabled and check.check(None) is None and check.check("Bearer anything") is None


def test_a_request_needs_a_configured_key_as_a_bearer_token() -> None:
    check = KeyCheck([KEY_A, KEY_B])
    assert check.check(f"Bearer {KEY_A}") is None and check.check(f"bearer {KEY_B}") is None
    for header, reason in [(None, "missing"), ("", "missing"), (KEY_A, "missing"), (f"Basic {KEY_A}", "missing"),
                           ("Bearer ", "missing"), (f"Bearer {KEY_A}x", "wrong"), (f"Bearer {KEY_A[:-1]}", "wrong")]:
        status, why, headers = check.check(header)
        assert (status, why) == (401, reason), header
        assert headers["WWW-Authenticate"].startswith("Bearer")
    assert all(len(d) == 32 for d in check.digests)  # only digests are kept, never the keys


def test_the_comparison_is_constant_time_over_every_key(monkeypatch) -> None:
    """Every configured key's digest is compared, with hmac.compare_digest, whichever matches."""
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(access.hmac, "compare_digest", lambda a, b: calls.append(b) or real(a, b))
    check = KeyCheck([KEY_A, KEY_B, "c" * 20])
    assert check.check(f"Bearer {KEY_A}") is None
    assert calls == check.digests
    calls.clear()
    assert check.check("Bearer not-a-key-of-this-service")[0] == 401 and calls == check.digests


def test_a_key_past_its_rate_waits_for_its_bucket() -> None:
    now = [100.0]
    check = KeyCheck([KEY_A, KEY_B], rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [check.check(f"Bearer {KEY_A}") for _ in range(3)] == [None] * 3
    status, reason, headers = check.check(f"Bearer {KEY_A}")
    assert (status, reason, headers["Retry-After"]) == (429, "rate", "1")  # 0.5 s to the next token: 1 s
    assert check.check(f"Bearer {KEY_B}") is None  # each key has its own bucket
    now[0] += 0.5
    assert check.check(f"Bearer {KEY_A}") is None and check.check(f"Bearer {KEY_A}")[0] == 429
    now[0] += 60  # refills to the burst, not beyond
    assert [check.check(f"Bearer {KEY_A}") for _ in range(4)][-1][0] == 429
    slow = KeyCheck([KEY_A], rate_per_s=0.01, burst=1, clock=lambda: now[0])
    assert slow.check(f"Bearer {KEY_A}") is None and slow.check(f"Bearer {KEY_A}")[2]["Retry-After"] == "100"
    with pytest.raises(ValueError):
        KeyCheck([KEY_A], rate_per_s=-1)
