"""A per-replica cap on requests in flight, that never depends on Redis.

It is the last line when the shared store is down (rate limits fail open) and a bound on the
work one ingress replica hands downstream. Full means refuse at once (503 + Retry-After), never
queue: a queue in front of a GPU only turns overload into timeouts.

Admission is a check-and-increment with no await in between, so it is atomic on the one event
loop an async deployment runs on; it is not thread-safe (do not use it from sync handlers).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator


class ConcurrencyCapReached(Exception):
    """The replica already runs `limit` requests."""

    def __init__(self, limit: int):
        super().__init__(f"this replica is already serving {limit} requests")
        self.limit = limit


class ConcurrencyCap:
    def __init__(self, limit: int):
        self.resize(limit)
        self.in_use = 0
        self.refused = 0  # exported as a metric by the ingress

    def resize(self, limit: int) -> None:
        """Takes effect for new requests; those already admitted run to completion."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the body of the `async with`; raises ConcurrencyCapReached when full."""
        if self.in_use >= self.limit:
            self.refused += 1
            raise ConcurrencyCapReached(self.limit)
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
