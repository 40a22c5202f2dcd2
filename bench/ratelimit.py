"""Cost and accuracy of a rate-limit decision (TokenBucketLimiter.take) against a local Redis.

Run from the repository root:  .venv/bin/python -m bench.ratelimit [--accuracy-seconds 10]

Starts its own redis-server (tools.local_services) in a temporary directory, then measures, from
one process on one event loop:
1. latency: p50/p99 of sequential takes (targets: p50 <= 1 ms, p99 <= 3 ms);
2. throughput: decisions per second with many concurrent coroutines (target >= 5,000/s);
3. accuracy: 8 clients hammering one bucket for 10 s through two separate connection pools (two
   ingress replicas); admitted must be within +-2 % of capacity + refill x elapsed, the elapsed
   time read from Redis's own clock, as the script does.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from redis.asyncio import Redis

from serve_app.security.ratelimit import TokenBucketLimiter
from serve_app.security.redis_store import request_path_client
from tools.local_services import RedisServer

LATENCY_P50_TARGET_MS = 1.0
LATENCY_P99_TARGET_MS = 3.0
THROUGHPUT_TARGET_PER_S = 5_000
ACCURACY_TOLERANCE = 0.02

LATENCY_SAMPLES = 5_000
THROUGHPUT_COROUTINES = 64
THROUGHPUT_SECONDS = 3.0
ACCURACY_CLIENTS = 8
ACCURACY_CAPACITY = 100
ACCURACY_REFILL_PER_S = 50.0
PLENTY = 1e12  # a bucket that never runs dry: measures the decision, not the denial


def verdict(met: bool) -> str:
    return "PASS" if met else "FAIL"


async def latency(limiter: TokenBucketLimiter) -> tuple[float, float]:
    key = uuid.uuid4().hex
    for _ in range(200):  # warm-up: script loaded, connection open
        await limiter.take(key, PLENTY, PLENTY, policy="bench-latency")
    durations_ms = []
    for _ in range(LATENCY_SAMPLES):
        started = time.perf_counter()
        await limiter.take(key, PLENTY, PLENTY, policy="bench-latency")
        durations_ms.append((time.perf_counter() - started) * 1000)
    percentiles = statistics.quantiles(durations_ms, n=100)
    return percentiles[49], percentiles[98]


async def throughput(limiter: TokenBucketLimiter) -> float:
    deadline = time.perf_counter() + THROUGHPUT_SECONDS
    counts = [0] * THROUGHPUT_COROUTINES

    async def client(index: int) -> None:
        key = f"{uuid.uuid4().hex}-{index}"
        while time.perf_counter() < deadline:
            await limiter.take(key, PLENTY, PLENTY, policy="bench-throughput")
            counts[index] += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(index) for index in range(THROUGHPUT_COROUTINES)))
    return sum(counts) / (time.perf_counter() - started)


async def redis_seconds(redis: Redis) -> float:
    seconds, microseconds = await redis.time()
    return seconds + microseconds / 1e6


async def accuracy(replicas: list[TokenBucketLimiter], clock: Redis, duration_s: float) -> tuple[int, float]:
    """(admitted, expected) for ACCURACY_CLIENTS clients sharing one bucket for `duration_s`."""
    key = uuid.uuid4().hex
    admitted = [0] * ACCURACY_CLIENTS
    deadline = time.perf_counter() + duration_s

    async def client(index: int) -> None:
        limiter = replicas[index % len(replicas)]
        while time.perf_counter() < deadline:
            decision = await limiter.take(key, ACCURACY_CAPACITY, ACCURACY_REFILL_PER_S, policy="bench-accuracy")
            admitted[index] += decision.allowed

    started = await redis_seconds(clock)
    await asyncio.gather(*(client(index) for index in range(ACCURACY_CLIENTS)))
    elapsed_s = await redis_seconds(clock) - started
    return sum(admitted), ACCURACY_CAPACITY + ACCURACY_REFILL_PER_S * elapsed_s


async def main(accuracy_seconds: float) -> int:
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory)).start()
        replica_clients = [request_path_client(server.url), request_path_client(server.url)]
        try:
            replicas = [TokenBucketLimiter(client) for client in replica_clients]
            p50_ms, p99_ms = await latency(replicas[0])
            per_s = await throughput(replicas[0])
            admitted, expected = await accuracy(replicas, replica_clients[0], accuracy_seconds)
        finally:
            for client in replica_clients:
                await client.aclose()
            server.stop()

    error = admitted / expected - 1
    results = [
        (f"take() p50 latency       {p50_ms:8.3f} ms   (target <= {LATENCY_P50_TARGET_MS} ms)", p50_ms <= LATENCY_P50_TARGET_MS),
        (f"take() p99 latency       {p99_ms:8.3f} ms   (target <= {LATENCY_P99_TARGET_MS} ms)", p99_ms <= LATENCY_P99_TARGET_MS),
        (
            f"throughput ({THROUGHPUT_COROUTINES} coroutines) {per_s:8.0f} /s   (target >= {THROUGHPUT_TARGET_PER_S} /s)",
            per_s >= THROUGHPUT_TARGET_PER_S,
        ),
        (
            f"accuracy ({ACCURACY_CLIENTS} clients, 2 pools, {accuracy_seconds:g} s) admitted {admitted} of expected "
            f"{expected:.1f} ({error:+.2%}; target within +-{ACCURACY_TOLERANCE:.0%})",
            abs(error) <= ACCURACY_TOLERANCE,
        ),
    ]
    for line, met in results:
        print(f"{verdict(met)}  {line}")
    return 0 if all(met for _, met in results) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accuracy-seconds", type=float, default=10.0)
    raise SystemExit(asyncio.run(main(parser.parse_args().accuracy_seconds)))
