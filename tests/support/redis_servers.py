"""A redis-server of a test's own, for tests that stop Redis: stopping the session's server would
wipe what other tests stored in it (it persists nothing)."""

from __future__ import annotations

from typing import Iterator

import pytest

from tools.local_services import RedisServer


@pytest.fixture
def private_redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()
