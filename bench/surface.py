"""The HTTP surface under hostile and flooding callers (issue 10, points 1 and 2):

1. 1 GiB sent with no credential to each route, with Content-Length and chunked: time from the
   request's headers to the answer's status line, and the ingress replica's RSS before and after
   (and its kernel high-water mark, VmHWM). Target: 401/413 (or the route's own 404/405) within
   0.1 s, ingress RSS + <= 16 MB.
2. 200 concurrent clients on /v1/ready for 10 s: no 5xx, and the /v1/align p50 meanwhile <= 1.2x
   its idle p50 (PocketSphinx backend, a 2.9 s eval clip). The 200 clients are an httpx AsyncClient
   (as the issue's report used) in a process of its own at the lowest CPU priority (nice 19): a
   flood's clients run on someone else's machine, and here, at normal priority, that client alone
   took one of the two cores (~100-160 requests/s), so the figure measured the client. What the
   service spends on each probe it receives stays at normal priority and is what the figure shows.
   A stress row follows, without a target: the same 200 connections as raw keep-alive sockets, the
   cheapest possible client (~13-15k requests/s here), which shows what a flood at that rate costs
   Serve's HTTP proxy when nothing is in front of it.

Loopback only; every loop is bounded in count and time. One Ingress replica, found by its process
title (Ray names replica processes "ray::ServeReplica:<app>:<deployment>").

    .venv/bin/python -m bench.surface [--repetitions 3]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import re
import socket
import statistics
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from bench.stack import BENCH_PLAN, Stack, with_bench_plan
from tests.support.cluster import ROOT, application_from_yaml, deployment_of, start_ray, start_serve

APP = f"surface{os.getpid()}"  # unique: other clusters on the box run Ingress replicas too
CLIP = ROOT.parent / "shared" / "eval" / "emuR_ae" / "msajc003.wav"
TRANSCRIPT = "amongst her friends she was considered beautiful"
GIB = 1024**3
SEND_CHUNK = 1024 * 1024
ROUTES = ["/v1/admin/keys", "/v1/admin/keys/k_1/rotate", "/v1/health", "/v1/nope", "/v1/align"]
TARGET_ANSWER_S = 0.1
TARGET_RSS_GROWTH_MB = 16
READY_CLIENTS, READY_SECONDS, TARGET_ALIGN_RATIO = 200, 10.0, 1.2
ALIGN_SAMPLES = 15


def ingress_pid() -> int:
    title = f"ServeReplica:{APP}:Ingress".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if title in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except OSError:
                continue
    raise RuntimeError("no Ingress replica process found")


def memory_mb(pid: int, field: str) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def gigabyte_without_credential(url: str, path: str, chunked: bool, limit_s: float = 10.0) -> tuple[int, float]:
    """Stream up to 1 GiB while reading the answer; stop sending once it arrives. (status, seconds)."""
    address = urlsplit(url)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {GIB}"
    head = f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    answered = threading.Event()
    with socket.create_connection((address.hostname, address.port), timeout=limit_s) as connection:

        def send_body() -> None:
            chunk = b"{" * SEND_CHUNK
            if chunked:
                chunk = b"%x\r\n" % SEND_CHUNK + chunk + b"\r\n"
            try:
                for _ in range(GIB // SEND_CHUNK):
                    if answered.is_set():
                        return
                    connection.sendall(chunk)
            except OSError:
                return  # the server closed the connection: it has answered

        started = time.monotonic()
        connection.sendall(head.encode())
        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        status_line = connection.recv(4096)
        elapsed = time.monotonic() - started
        answered.set()
    sender.join(limit_s)
    return int(status_line.split(b" ", 2)[1]), elapsed


def timed_align(client: httpx.Client, audio: bytes, refused: dict[int, int] | None = None) -> float:
    """Seconds of one alignment; a refusal is counted in `refused` (or raised when it is None)."""
    started = time.perf_counter()
    response = client.post("/v1/align", files={"audio": ("clip.wav", audio)}, data={"text": TRANSCRIPT})
    if response.status_code != 200:
        if refused is None:
            response.raise_for_status()
        refused[response.status_code] = refused.get(response.status_code, 0) + 1
    return time.perf_counter() - started


async def flood_ready(url: str, stop_at: float) -> dict[int, int]:
    """READY_CLIENTS httpx clients asking /v1/ready until `stop_at`: how many of each status."""
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=READY_CLIENTS, max_keepalive_connections=READY_CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one_client() -> None:
            while time.monotonic() < stop_at:
                try:
                    status = (await client.get("/v1/ready")).status_code
                except httpx.HTTPError:
                    status = 0  # no answer at all counts against the target like a 5xx
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(one_client() for _ in range(READY_CLIENTS)))
    return statuses


async def flood_ready_raw(url: str, stop_at: float) -> dict[int, int]:
    """The same flood over READY_CLIENTS raw keep-alive sockets: no client library's cost per request."""
    parts = urlsplit(url)
    statuses: dict[int, int] = {}
    request = f"GET /v1/ready HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()

    async def one_client() -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            while time.monotonic() < stop_at:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                status = int(head.split(b" ", 2)[1])
                statuses[status] = statuses.get(status, 0) + 1
        except (OSError, asyncio.IncompleteReadError, ValueError):
            statuses[0] = statuses.get(0, 0) + 1  # the connection failed: counts like a 5xx
        finally:
            writer.close()

    await asyncio.gather(*(one_client() for _ in range(READY_CLIENTS)))
    return statuses


def align_p50_during_ready_flood(url: str, key: str, audio: bytes, raw: bool = False) -> tuple[float, dict[int, int], dict[int, int]]:
    # The flood runs in a process of its own, as a load balancer's probes come from elsewhere: in a
    # thread of this process its event loop held the GIL the timed client needed, and the figure
    # measured this script more than the service.
    stop_in_s = READY_SECONDS
    answers = multiprocessing.get_context("spawn").Queue()
    flood = multiprocessing.get_context("spawn").Process(target=_flood_process, args=(url, stop_in_s, answers, raw))
    flood.start()
    stop_at = time.monotonic() + stop_in_s
    time.sleep(2.0)  # the child starts (spawn) and its 200 clients connect
    latencies = []
    refused: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
        while time.monotonic() < stop_at - 0.5 and len(latencies) < 100:
            latencies.append(timed_align(client, audio, refused))
    statuses = answers.get(timeout=READY_SECONDS + 60)
    flood.join(60)
    return statistics.median(latencies), statuses, refused


def _flood_process(url: str, stop_in_s: float, answers, raw: bool) -> None:
    os.nice(19)  # the flood's clients are not the service's CPU (module docstring)
    answers.put(asyncio.run((flood_ready_raw if raw else flood_ready)(url, time.monotonic() + stop_in_s)))


def summary(values: list[float], unit: str, scale: float = 1.0, digits: int = 1) -> str:
    return f"median {statistics.median(values) * scale:.{digits}f} {unit} (range {min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repetitions", type=int, default=3)
    arguments = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stack = Stack()
    start_ray()

    def edit(app: dict) -> None:
        with_bench_plan(app)["args"].update(backend="pocketsphinx")
        deployment_of(app, "Ingress")["autoscaling_config"].update(min_replicas=1, max_replicas=1)

    url = start_serve([application_from_yaml(APP, "/", edit)])
    key = stack.api_key(BENCH_PLAN)
    audio = CLIP.read_bytes()
    pid = ingress_pid()
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
        for _ in range(3):
            timed_align(client, audio)  # warm: backend info cached, connections open

    print(f"-- 1 GiB with no credential ({arguments.repetitions} per route and framing)")
    rss_before, peak_before = memory_mb(pid, "VmRSS"), memory_mb(pid, "VmHWM")
    worst: list[float] = []
    for path in ROUTES:
        for chunked in (False, True):
            runs = [gigabyte_without_credential(url, path, chunked) for _ in range(arguments.repetitions)]
            seconds = [elapsed for _, elapsed in runs]
            worst.append(max(seconds))
            statuses = sorted({status for status, _ in runs})
            print(f"{path:<28} {'chunked' if chunked else 'content-length':<15} status {statuses}  answer {summary(seconds, 'ms', 1000)}")
    time.sleep(2)
    rss_after, peak_after = memory_mb(pid, "VmRSS"), memory_mb(pid, "VmHWM")
    print(f"ingress RSS {rss_before:.0f} -> {rss_after:.0f} MB (+{rss_after - rss_before:.1f}); VmHWM {peak_before:.0f} -> {peak_after:.0f} MB")
    print(f"slowest answer {max(worst) * 1000:.1f} ms (target <= {TARGET_ANSWER_S * 1000:.0f}): {'PASS' if max(worst) <= TARGET_ANSWER_S else 'FAIL'}")
    growth = max(rss_after - rss_before, peak_after - peak_before)
    print(f"ingress memory growth {growth:.1f} MB (target <= {TARGET_RSS_GROWTH_MB}): {'PASS' if growth <= TARGET_RSS_GROWTH_MB else 'FAIL'}")

    print(f"\n-- {READY_CLIENTS} concurrent /v1/ready for {READY_SECONDS:.0f} s, /v1/align p50 meanwhile")
    ratios: list[float] = []
    for _ in range(arguments.repetitions):
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
            idle_refused: dict[int, int] = {}
            idle = statistics.median([timed_align(client, audio, idle_refused) for _ in range(ALIGN_SAMPLES)])
        loaded, statuses, refused = align_p50_during_ready_flood(url, key, audio)
        server_errors = sum(count for status, count in statuses.items() if status == 0 or status >= 500)
        ratios.append(loaded / idle)
        print(f"idle p50 {idle * 1000:.0f} ms, during flood {loaded * 1000:.0f} ms ({loaded / idle:.2f}x); /v1/ready answers {dict(sorted(statuses.items()))}, 5xx/none {server_errors}; align refusals {refused} (idle: {idle_refused})")
    print(f"align p50 ratio {summary(ratios, 'x', digits=2)} (target <= {TARGET_ALIGN_RATIO}): {'PASS' if statistics.median(ratios) <= TARGET_ALIGN_RATIO else 'FAIL'}")

    print(f"\n-- stress, no target: the same flood over {READY_CLIENTS} raw keep-alive sockets")
    for _ in range(arguments.repetitions):
        loaded, statuses, refused = align_p50_during_ready_flood(url, key, audio, raw=True)
        answered = sum(statuses.values())
        print(f"during flood {loaded * 1000:.0f} ms ({loaded / idle:.2f}x the last idle p50); {answered / READY_SECONDS:.0f} /v1/ready answers a second, statuses {dict(sorted(statuses.items()))}; align refusals {refused}")


if __name__ == "__main__":
    main()
