"""The Redis client the request path uses, and the Lua scripts it runs.

Redis sits in front of every request (bans, rate limits), so a slow or absent Redis must cost
milliseconds, not seconds: redis-py 8's default client retries a failed connection 10 times with
backoff and waits 5 s on a socket. `request_path_client` instead fails within `timeout_s` and
retries once, immediately (which is what a pooled connection that went stale across a Redis
restart needs, and a connect that missed its deadline on a busy event loop). A Redis that accepts
connections and never answers (frozen, or a black-holed route) therefore costs 2 x `timeout_s`
per call (measured: bench/redis_outage.py part 0); a stopped one, about a millisecond. Callers
decide what a failure means (fail open or closed) and count it.

Redis Sentinel (settings.RedisSentinel, from ALIGNER_REDIS_SENTINELS): every client the service
creates asks the sentinels for the current master of the named service, on each new connection.
When the master dies, calls fail (callers' failure policies apply) until a replica is promoted;
then the next connection goes to the new master. A demoted master answering READONLY drops the
connection the same way. Nothing is cached across that but the pool's connections.

Scripts are resource files next to this module. `load_script` returns redis-py's script object:
it calls EVALSHA and, on NOSCRIPT (first use, or a Redis that restarted and lost its script
cache), SCRIPT LOADs the text and retries.
"""

from __future__ import annotations

import asyncio
import logging
from importlib import resources

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from serve_app.settings import RedisSentinel

# What a failed store call raises: unreachable, timed out, pool exhausted, or an error reply
# (OOM, READONLY, LOADING...). Callers apply their failure policy to all of them and count it.
STORE_ERRORS = (RedisError, OSError)


def stop_if_cancelled() -> None:
    """Raise CancelledError if the running task has been cancelled.

    redis-py (8.1) can complete a command normally on a task that was cancelled while the command
    ran (seen under load, a few times in a hundred: tests/test_job_runner.py): the cancellation is
    lost, and a loop around store calls outlives it for good (a runner that never stops, a test run
    that never ends). The clients made here check it after every command (_Client)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def request_path_client(
    url: str, timeout_s: float = 0.25, max_connections: int = 64, sentinel: RedisSentinel | None = None
) -> Redis:
    """A client that gives up quickly: one immediate retry, short connect and socket timeouts.

    The pool blocks (up to `timeout_s`) when all `max_connections` are busy instead of raising at
    once, so a burst of concurrent requests queues briefly rather than being counted as an outage.
    """
    return redis_client(url, sentinel, timeout_s=timeout_s, max_connections=max_connections)


def redis_client(url: str, sentinel: RedisSentinel | None, *, timeout_s: float, max_connections: int = 64) -> Redis:
    """A Redis client for `url`, or for the master `sentinel` names; calls fail after `timeout_s`
    (socket, connect, and waiting for a pooled connection), retried once at once."""
    settings = dict(
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), retries=1),
        decode_responses=True,
    )
    if sentinel is None:
        return _Client.from_pool(BlockingConnectionPool.from_url(url, **settings))
    # The URL still says who we are on the master (username, password, database), not where it is.
    identity = {name: value for name, value in parse_url(url).items() if name in ("username", "password", "db")}
    sentinels = Sentinel(
        sentinel.addresses,
        sentinel_kwargs=dict(
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            password=sentinel.password.get_secret_value() if sentinel.password else None,
        ),
    )
    return sentinels.master_for(
        sentinel.service_name, redis_class=_SentinelMasterClient, connection_pool_class=_BlockingSentinelPool, **identity, **settings
    )


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's master discovery with the blocking pool's bounded wait for a free connection."""


class _Client(Redis):
    """redis-py's client, but a command never returns on a task cancelled while it ran
    (stop_if_cancelled): every loop around store calls stops when its task is cancelled."""

    async def execute_command(self, *args, **options):
        answer = await super().execute_command(*args, **options)
        stop_if_cancelled()
        return answer


class _SentinelMasterClient(_Client):
    """Closing the master client also closes its connections to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        await self.connection_pool.sentinel_manager.aclose()


def load_script(redis: Redis, filename: str, package: str | None = __package__) -> AsyncScript:
    """The Lua script `filename` shipped in `package` (default this one), bound to `redis`."""
    text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
    return redis.register_script(text)


class StoreHealth:
    """Counts failed store calls; logs when failures start and when the store answers again,
    never once per request (an outage would otherwise flood the log)."""

    def __init__(self, logger: logging.Logger, what: str):
        self._logger = logger
        self._what = what
        self._healthy = True
        self.failures = 0  # exported as a metric by the ingress

    def failed(self, error: Exception, consequence: str) -> None:
        self.failures += 1
        if self._healthy:
            self._healthy = False
            self._logger.error("%s: Redis failed (%s); %s until it answers", self._what, type(error).__name__, consequence)

    def answered(self) -> None:
        if not self._healthy:
            self._healthy = True
            self._logger.warning("%s: Redis answers again (%d failed calls so far)", self._what, self.failures)
