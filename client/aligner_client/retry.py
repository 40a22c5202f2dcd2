"""When a failed call is tried again, and how long to wait first.

- 429 and 503 (and 408, 502, 504) are retried after the server's Retry-After, capped at
  `max_retry_after_s`, or after exponential backoff where it sent none;
- a connection that failed or broke (refused, reset, timed out) is retried with exponential backoff;
- every other 4xx is the request's own fault and never retried; neither is a 500;
- waits get up to `jitter` more (random), so many clients told the same Retry-After do not come
  back in the same millisecond;
- `attempts` bounds the tries in all, the first one included.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

RETRIED_STATUSES = frozenset({408, 429, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    max_retry_after_s: float = 60.0
    backoff_s: float = 0.5
    max_backoff_s: float = 20.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1 (1: never retry)")
        if min(self.max_retry_after_s, self.backoff_s, self.max_backoff_s, self.jitter) < 0:
            raise ValueError("waits and jitter must be >= 0")

    def delay(self, retry: int, retry_after_s: float | None) -> float:
        """Seconds to wait before retry number `retry` (1: the first retry)."""
        if retry_after_s is not None:
            base = min(max(retry_after_s, 0.0), self.max_retry_after_s)
        else:
            base = min(self.backoff_s * 2 ** (retry - 1), self.max_backoff_s)
        return base * (1.0 + self.jitter * random.random())


NO_RETRIES = RetryPolicy(attempts=1)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After's seconds (delta-seconds or an HTTP date); None when absent or malformed."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)
