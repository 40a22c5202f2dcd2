"""What the service adds on top of Serve's own hops, and how well the aligner batches.

Deploys, on one local Ray cluster, from configs/serve.yaml:
- "/":       our graph with the PocketSphinx backend;
- "/qwen3":  our graph with the tiny random-weight Qwen3 checkpoint (real qwen_asr batched path);
- "/bare":   bench/passthrough.py, the same three hops doing nothing (Serve's floor).

Then, for a 2.9 s eval clip, at concurrency 1 and 8:
- p50 latency of POST /v1/align on "/" and on "/bare";
- the backend's own time for the batch sizes the aligner actually formed, measured in-process;
- overhead = p50(ours) - backend time, and overhead / p50(bare);
- the aligner's mean batch size at concurrency 8 (target >= 4), for both backends.

    .venv/bin/python -m bench.service [--requests 64]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import tempfile
import time
from pathlib import Path

import logging

import httpx
import soundfile

from bench.stack import BENCH_PLAN, Stack, with_bench_plan
from tests.support.cluster import ROOT, application_from_yaml, start_ray, start_serve

CLIP = ROOT.parent / "shared" / "eval" / "emuR_ae" / "msajc003.wav"
TRANSCRIPT = "amongst her friends she was considered beautiful"
TARGET_MEAN_BATCH = 4.0
API_KEY = ""  # set by main() once the stack is up


def _client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {API_KEY}"})


def _timed_post(client: httpx.Client, path: str, audio: bytes) -> float:
    started = time.perf_counter()
    response = client.post(path, files={"audio": ("clip.wav", audio)}, data={"text": TRANSCRIPT})
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


def warm_up(url: str, audio: bytes) -> None:
    with _client(url) as client:
        for path in ("/v1/align", "/qwen3/v1/align", "/bare/v1/align"):
            for _ in range(3):
                _timed_post(client, path, audio)


def p50_latency(url: str, path: str, audio: bytes, concurrency: int, requests: int) -> float:
    with _client(url) as client:
        with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
            latencies = list(pool.map(lambda _: _timed_post(client, path, audio), range(requests)))
    return statistics.median(latencies)


def batch_sizes(app_name: str) -> dict[int, int]:
    from ray import serve

    return serve.get_deployment_handle("Aligner", app_name=app_name).batch_sizes.remote().result()


def mean_batch(before: dict[int, int], after: dict[int, int]) -> float:
    counts = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    batches = sum(counts.values())
    return sum(size * count for size, count in counts.items()) / batches if batches else 0.0


def backend_seconds(batch_size: int, repetitions: int = 7) -> float:
    """PocketSphinx's own time for one batch of `batch_size` copies of the clip, median."""
    from deployments.backends.base import AlignmentJob
    from deployments.backends.pocketsphinx import PocketSphinxBackend

    samples, _ = soundfile.read(CLIP, dtype="float32")
    backend = PocketSphinxBackend()
    jobs = [AlignmentJob(samples, tuple(TRANSCRIPT.split()), "English")] * max(1, round(batch_size))
    backend.align_batch(jobs)
    timings = []
    for _ in range(repetitions):
        started = time.perf_counter()
        backend.align_batch(jobs)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement")
    arguments = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from tests.support.tiny_qwen3 import write_tiny_checkpoint

    global API_KEY
    checkpoint = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="tiny-qwen3-")))
    stack = Stack()
    API_KEY = stack.api_key(BENCH_PLAN)
    start_ray()

    def pocketsphinx(app: dict) -> None:
        with_bench_plan(app)["args"].update(backend="pocketsphinx")

    def tiny_qwen3(app: dict) -> None:
        with_bench_plan(app)["args"].update(backend="qwen3", qwen3_model=str(checkpoint), qwen3_dtype="float32")

    url = start_serve(
        [
            application_from_yaml("aligner", "/", pocketsphinx),
            application_from_yaml("qwen3", "/qwen3", tiny_qwen3),
            {"name": "bare", "route_prefix": "/bare", "import_path": "bench.passthrough:build_app"},
        ]
    )
    audio = CLIP.read_bytes()
    warm_up(url, audio)

    print(f"clip: {CLIP.name} ({soundfile.info(CLIP).duration:.2f} s), {arguments.requests} requests per row\n")
    print(f"{'concurrency':>11} {'ours p50':>9} {'batch':>6} {'backend':>8} {'overhead':>9} {'bare p50':>9} {'overhead/bare':>13}")
    for concurrency in (1, 8):
        before = batch_sizes("aligner")
        ours = p50_latency(url, "/v1/align", audio, concurrency, arguments.requests)
        batch = mean_batch(before, batch_sizes("aligner"))
        bare = p50_latency(url, "/bare/v1/align", audio, concurrency, arguments.requests)
        backend = backend_seconds(batch)
        overhead = ours - backend
        print(
            f"{concurrency:>11} {ours * 1000:>7.1f}ms {batch:>6.2f} {backend * 1000:>6.1f}ms "
            f"{overhead * 1000:>7.1f}ms {bare * 1000:>7.1f}ms {overhead / bare:>12.2f}x"
        )

    print("\nmean aligner batch size at concurrency 8:")
    for app_name, path in (("aligner", "/v1/align"), ("qwen3", "/qwen3/v1/align")):
        before = batch_sizes(app_name)
        p50_latency(url, path, audio, 8, arguments.requests)
        batch = mean_batch(before, batch_sizes(app_name))
        print(f"  {app_name:>8}: {batch:.2f}  (target >= {TARGET_MEAN_BATCH}: {'PASS' if batch >= TARGET_MEAN_BATCH else 'FAIL'})")


if __name__ == "__main__":
    main()
