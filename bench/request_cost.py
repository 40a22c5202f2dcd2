"""What one POST /v1/align costs besides the alignment: Redis round trips, Serve calls, bytes moved (issue 15).

Deploys our graph (PocketSphinx backend, configs/serve.yaml) on a local stack, warms it up, then
sends `--requests` sequential requests of the 2.9 s eval clip and prints, per request:
- Redis round trips: the server's `total_reads_processed` (one read event per request packet; a
  pipeline's commands arrive together), and its commands by name (INFO commandstats). From both,
  what the same time idle costs is taken away (the dependency probe, the job runner's stream reads);
- Serve calls, by deployment: `ray_serve_deployment_request_counter` with route "/v1/align" (a call
  made while serving a request carries its route; background probes carry none);
- bytes the ingress process reads and writes with read()/write() (/proc/<pid>/io rchar, wchar: the
  spool files; Ray's own transfers, the HTTP body included, do not show), next to the upload and
  its decoded 16 kHz PCM: how often the audio passes through the ingress's own hands.

    .venv/bin/python -m bench.request_cost [--requests 50]
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections import Counter
from pathlib import Path

import httpx
import redis
import soundfile

from bench.service import CLIP, TRANSCRIPT
from bench.stack import BENCH_PLAN, Stack, with_bench_plan
from tests.support.cluster import application_from_yaml, metrics_url, start_ray, start_serve

_SERVE_CALLS = re.compile(r'^ray_serve_deployment_request_counter_total\{([^}]*)\} ([0-9.e+]+)$', re.MULTILINE)


def redis_counters(client: redis.Redis) -> Counter:
    counters = Counter({"round trips": client.info("stats")["total_reads_processed"]})
    for name, stats in client.info("commandstats").items():
        counters[name.removeprefix("cmdstat_")] = stats["calls"]
    return counters


def serve_calls(application: str, route: str) -> Counter:
    calls: Counter = Counter()
    for labels, value in _SERVE_CALLS.findall(httpx.get(metrics_url(), timeout=10).text):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if tags.get("application") == application and tags.get("route") == route:
            calls[tags["deployment"]] += float(value)
    return calls


def settled_serve_calls(application: str, route: str, expected_at_least: float) -> Counter:
    """The counters once Ray has exported them: at least the expected total, unchanged for one export."""
    previous = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        calls = serve_calls(application, route)
        if calls == previous and sum(calls.values()) >= expected_at_least:
            return calls
        previous = calls
        time.sleep(6)
    raise RuntimeError(f"Serve's request counters did not settle: {previous}")


def ingress_pid(application: str) -> int:
    """The ingress replica's process (Ray titles it ray::ServeReplica:<application>:Ingress)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(f"ray::ServeReplica:{application}:Ingress".encode()):
                return int(cmdline.parent.name)
        except OSError:
            continue
    raise RuntimeError("no ingress replica process found")


def process_io(pid: int) -> Counter:
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return Counter({"read": int(fields["rchar"]), "written": int(fields["wchar"])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50)
    arguments = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)

    stack = Stack()
    key = stack.api_key(BENCH_PLAN)
    start_ray()
    url = start_serve([application_from_yaml("aligner", "/", lambda app: with_bench_plan(app)["args"].update(backend="pocketsphinx"))])
    store = redis.Redis.from_url(stack.redis.url)
    audio = CLIP.read_bytes()
    pcm_bytes = round(soundfile.info(CLIP).duration * 16000) * 2
    pid = ingress_pid("aligner")

    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:

        def post() -> None:
            client.post("/v1/align", files={"audio": ("clip.wav", audio)}, data={"text": TRANSCRIPT}).raise_for_status()

        for _ in range(5):
            post()
        calls_before = settled_serve_calls("aligner", "/v1/align", 5)

        idle_before, started = redis_counters(store), time.monotonic()
        time.sleep(10)
        idle = redis_counters(store) - idle_before
        idle_s = time.monotonic() - started

        redis_before, io_before, started = redis_counters(store), process_io(pid), time.monotonic()
        for _ in range(arguments.requests):
            post()
        busy_s = time.monotonic() - started
        redis_used, io_used = redis_counters(store) - redis_before, process_io(pid) - io_before
        calls = settled_serve_calls("aligner", "/v1/align", sum(calls_before.values()) + 2 * arguments.requests) - calls_before

    n = arguments.requests
    print(f"{n} sequential requests, {CLIP.name} ({len(audio)} B upload, {pcm_bytes} B of decoded PCM)\n")
    print("Redis, per request (less the idle rate over the same time):")
    for name in ["round trips", *sorted(set(redis_used) - {"round trips"})]:
        per_request = (redis_used[name] - idle[name] * busy_s / idle_s) / n
        if abs(per_request) >= 0.05:
            print(f"  {name:<14} {per_request:5.2f}")
    print("Serve calls, per request:")
    for deployment, count in sorted(calls.items()):
        print(f"  {deployment:<14} {count / n:5.2f}")
    print("ingress process read()/write(), per request (the spool files):")
    for what, count in sorted(io_used.items()):
        print(f"  {what:<8} {count / n:9.0f} B = {count / n / len(audio):4.2f} x the upload, {count / n / pcm_bytes:4.2f} x the PCM")


if __name__ == "__main__":
    main()
