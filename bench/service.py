"""What the service adds on top of Serve's own hops, and how well the aligner batches (issue 15).

Deploys, on one local Ray cluster, from configs/serve.yaml:
- "/":         our graph with the PocketSphinx backend;
- "/qwen3":    our graph with the tiny random-weight Qwen3 checkpoint (real qwen_asr batched path),
               deployed for the last row only;
- "/bare":     bench/passthrough.py, the same three hops doing nothing (Serve's floor);
- "/bare-ps":  the same pass-through graph with the PocketSphinx backend in its aligner.
All four batch with the same mechanism (deployments.batching: continuous batching).

Then, for a 2.9 s eval clip:
- concurrency 1: p50 of ours against p50(bare) + the backend's own time for that clip (measured
  in-process, median of 7): target ratio <= 1.25; and, for context, against "/bare-ps";
- concurrency 8: throughput and p50 of ours against "/bare-ps": targets >= 0.8x and <= 2.0x;
- the aligner's mean batch size at concurrency 8, for both of our backends (target >= 4 for Qwen3).

    .venv/bin/python -m bench.service [--requests 64]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import logging

import httpx
import soundfile

from bench.stack import BENCH_PLAN, Stack, with_bench_plan
from tests.support.cluster import ROOT, application_from_yaml, deploy, start_ray, start_serve

CLIP = ROOT.parent / "shared" / "eval" / "emuR_ae" / "msajc003.wav"
TRANSCRIPT = "amongst her friends she was considered beautiful"
TARGET_MEAN_BATCH = 4.0
TARGET_SINGLE_RATIO = 1.25
TARGET_THROUGHPUT_RATIO = 0.8
TARGET_LATENCY_RATIO = 2.0
API_KEY = ""  # set by main() once the stack is up


def _client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {API_KEY}"})


def _timed_post(client: httpx.Client, path: str, audio: bytes) -> float:
    started = time.perf_counter()
    response = client.post(path, files={"audio": ("clip.wav", audio)}, data={"text": TRANSCRIPT})
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


def warm_up(url: str, audio: bytes, paths: tuple[str, ...]) -> None:
    with _client(url) as client:
        for path in paths:
            for _ in range(3):
                _timed_post(client, path, audio)


@dataclass(frozen=True)
class Run:
    p50_s: float
    requests_per_s: float


def measure(url: str, path: str, audio: bytes, concurrency: int, requests: int) -> Run:
    with _client(url) as client:
        with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
            started = time.perf_counter()
            latencies = list(pool.map(lambda _: _timed_post(client, path, audio), range(requests)))
            wall = time.perf_counter() - started
    return Run(statistics.median(latencies), requests / wall)


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
    start_ray(num_cpus=6)  # logical: four applications' replicas on the 2 real cores

    def pocketsphinx(app: dict) -> None:
        with_bench_plan(app)["args"].update(backend="pocketsphinx")

    def tiny_qwen3(app: dict) -> None:
        with_bench_plan(app)["args"].update(backend="qwen3", qwen3_model=str(checkpoint), qwen3_dtype="float32")

    applications = [
        application_from_yaml("aligner", "/", pocketsphinx),
        {"name": "bare", "route_prefix": "/bare", "import_path": "bench.passthrough:build_app", "args": {"backend": "none"}},
        {"name": "bare-ps", "route_prefix": "/bare-ps", "import_path": "bench.passthrough:build_app", "args": {"backend": "pocketsphinx"}},
    ]
    url = start_serve(applications)
    audio = CLIP.read_bytes()
    warm_up(url, audio, ("/v1/align", "/bare/v1/align", "/bare-ps/v1/align"))

    print(f"clip: {CLIP.name} ({soundfile.info(CLIP).duration:.2f} s), {arguments.requests} requests per row\n")
    before = batch_sizes("aligner")
    ours = measure(url, "/v1/align", audio, 1, arguments.requests)
    single = mean_batch(before, batch_sizes("aligner"))
    bare = measure(url, "/bare/v1/align", audio, 1, arguments.requests)
    bare_backend = measure(url, "/bare-ps/v1/align", audio, 1, arguments.requests)
    backend = backend_seconds(1)
    ratio = ours.p50_s / (bare.p50_s + backend)
    print("concurrency 1:")
    print(f"  ours p50 {ours.p50_s * 1000:.1f} ms (mean batch {single:.2f}); bare p50 {bare.p50_s * 1000:.1f} ms; backend {backend * 1000:.1f} ms")
    print(f"  ours / (bare + backend) = {ratio:.3f}  (target <= {TARGET_SINGLE_RATIO}: {verdict(ratio <= TARGET_SINGLE_RATIO)})")
    # For context: the backend inside a replica (sharing the GIL with Ray's threads), not in this process.
    print(f"  bare graph with the backend: p50 {bare_backend.p50_s * 1000:.1f} ms; ours / that = {ours.p50_s / bare_backend.p50_s:.3f}")

    before = batch_sizes("aligner")
    ours = measure(url, "/v1/align", audio, 8, 2 * arguments.requests)
    batch = mean_batch(before, batch_sizes("aligner"))
    bare = measure(url, "/bare-ps/v1/align", audio, 8, 2 * arguments.requests)
    throughput, latency = ours.requests_per_s / bare.requests_per_s, ours.p50_s / bare.p50_s
    print("concurrency 8 (bare graph with the PocketSphinx backend):")
    print(f"  ours {ours.requests_per_s:.2f} req/s, p50 {ours.p50_s * 1000:.1f} ms; bare {bare.requests_per_s:.2f} req/s, p50 {bare.p50_s * 1000:.1f} ms")
    print(f"  throughput ours / bare = {throughput:.2f}  (target >= {TARGET_THROUGHPUT_RATIO}: {verdict(throughput >= TARGET_THROUGHPUT_RATIO)})")
    print(f"  p50 ours / bare = {latency:.2f}  (target <= {TARGET_LATENCY_RATIO}: {verdict(latency <= TARGET_LATENCY_RATIO)})")

    print("mean aligner batch size at concurrency 8:")
    print(f"  pocketsphinx: {batch:.2f}")
    # Deployed only now: its background work (probes, the job runner) must not weigh on the rows above.
    deploy([*applications, application_from_yaml("qwen3", "/qwen3", tiny_qwen3)])
    warm_up(url, audio, ("/qwen3/v1/align",))
    before = batch_sizes("qwen3")
    measure(url, "/qwen3/v1/align", audio, 8, 2 * arguments.requests)
    batch = mean_batch(before, batch_sizes("qwen3"))
    print(f"  tiny qwen3: {batch:.2f}  (target >= {TARGET_MEAN_BATCH}: {verdict(batch >= TARGET_MEAN_BATCH)})")


def verdict(met: bool) -> str:
    return "PASS" if met else "FAIL"


if __name__ == "__main__":
    main()
