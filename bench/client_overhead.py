"""What the Python client costs over bare httpx: 100 short clips aligned at concurrency 8.

Deploys configs/serve.yaml's application (PocketSphinx) on a local Ray cluster with a plan that is
never the limit, then sends the same 100 POST /v1/align requests (the 7 dev clips in turn, 8 in
flight) two ways, in alternating rounds so drift in the service hits both alike:

- bare: httpx.AsyncClient.post with the multipart body, then response.json();
- client: aligner_client.AsyncClient.align (the same request through the protocol operation, its
  retry policy and its typed Alignment).

Reported: each side's median round time, their ratio, and the range of the per-round-pair ratios;
and the CPU the calling process spent per request on each side (steadier than wall time, which the
service dominates).
Target (exit 1 when missed): client median <= 1.05 x bare median.

    .venv/bin/python -m bench.client_overhead [--rounds 6] [--requests 100] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import httpx

from aligner_client import AsyncClient
from bench.stack import BENCH_PLAN, Stack, with_bench_plan
from tests.support.cluster import application_from_yaml, start_ray, start_serve

EVAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "eval" / "emuR_ae"
TARGET_RATIO = 1.05


def _clips() -> list[tuple[bytes, str]]:
    utterances = json.loads((EVAL_DIR / "reference.json").read_text())["utterances"]
    return [((EVAL_DIR / u["audio"]).read_bytes(), u["transcript"]) for u in utterances]


async def _in_flight(concurrency: int, work: list, call) -> tuple[float, float]:
    """Wall seconds for `call(item)` over every item, `concurrency` at once, and this process's
    CPU seconds meanwhile (what the calling side itself spent: the service runs in other processes)."""
    slots = asyncio.Semaphore(concurrency)

    async def one(item) -> None:
        async with slots:
            await call(item)

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(item) for item in work))
    return time.perf_counter() - started, time.process_time() - cpu


async def _rounds(url: str, key: str, arguments: argparse.Namespace) -> tuple[list[float], list[float]]:
    clips = _clips()
    work = [clips[index % len(clips)] for index in range(arguments.requests)]
    limits = httpx.Limits(max_connections=arguments.concurrency)
    bare_times, client_times = [], []
    cpu: dict[str, list[float]] = {"bare": [], "client": []}
    async with (
        httpx.AsyncClient(base_url=url, timeout=600, headers={"Authorization": f"Bearer {key}"}, limits=limits) as bare,
        AsyncClient(url, api_key=key, max_connections=arguments.concurrency) as client,
    ):

        async def bare_align(item) -> None:
            audio, text = item
            response = await bare.post("/v1/align", files={"audio": ("audio", audio, "application/octet-stream")}, data={"text": text, "format": "json"})
            response.raise_for_status()
            response.json()

        async def client_align(item) -> None:
            audio, text = item
            await client.align(audio, text)

        await _in_flight(arguments.concurrency, work[:24], bare_align)  # warm-up: connections, replicas
        await _in_flight(arguments.concurrency, work[:24], client_align)
        for index in range(arguments.rounds):
            sides = [("bare", bare_times, bare_align), ("client", client_times, client_align)]
            for name, times, call in sides if index % 2 == 0 else reversed(sides):
                wall_s, cpu_s = await _in_flight(arguments.concurrency, work, call)
                times.append(wall_s)
                cpu[name].append(cpu_s * 1000 / len(work))
            print(f"round {index + 1}: bare {bare_times[-1]:.2f} s, client {client_times[-1]:.2f} s", flush=True)
    print(f"calling process CPU per request (median of rounds): bare {statistics.median(cpu['bare']):.2f} ms, client {statistics.median(cpu['client']):.2f} ms")
    return bare_times, client_times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    arguments = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stack = Stack()
    start_ray()
    url = start_serve([application_from_yaml("aligner", "/", with_bench_plan)], request_timeout_s=600)
    bare, client = asyncio.run(_rounds(url, stack.api_key(BENCH_PLAN), arguments))
    ratio = statistics.median(client) / statistics.median(bare)
    pairs = sorted(c / b for b, c in zip(bare, client))
    print(
        f"{arguments.requests} clips at concurrency {arguments.concurrency}, {arguments.rounds} rounds each: "
        f"bare median {statistics.median(bare):.2f} s, client median {statistics.median(client):.2f} s, "
        f"ratio {ratio:.3f} (per round {pairs[0]:.3f}-{pairs[-1]:.3f}); target <= {TARGET_RATIO}"
    )
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
