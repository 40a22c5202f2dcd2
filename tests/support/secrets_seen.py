"""Every secret the test suite hands the service, so the last test can prove none of them was logged.

Whatever creates a credential for the running graph (an API key, an access token) passes it through
`remember()`; tests/test_zz_no_secrets_in_logs.py then searches every log the service wrote for each
of them. The registry lives for one pytest process, like the session's Ray cluster.
"""

from __future__ import annotations

_SEEN: set[str] = set()


def remember(secret: str) -> str:
    """Record `secret` and return it unchanged (so `return remember(text)` reads naturally)."""
    _SEEN.add(secret)
    return secret


def seen() -> frozenset[str]:
    return frozenset(_SEEN)
