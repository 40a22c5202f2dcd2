"""Our graph against the same model called in-process, on a GPU (issue 15): a full-size random-weight Qwen3.

One short script, under 5 minutes on one H200:
1. writes a random-weight checkpoint of the real architecture at full size, in bf16
   (tests.support.tiny_qwen3.FULL_SIZE; the real weights cannot be downloaded there either);
2. serves configs/serve.gpu.yaml's application on a local stack (Redis, clamd, Ray with the GPU),
   one Aligner replica on the GPU with that checkpoint, and sends `--requests` POST /v1/align of a
   3 s clip from `--concurrency` clients: requests per second, and the batches the Aligner formed;
3. shuts the graph down and calls the same model in-process (deployments.backends.qwen3) on the
   same batches (the same sizes, as many of each), jobs per second;
4. prints graph / in-process throughput (target >= 0.9) and the mean batch.

Needs the project's dependencies with a CUDA build of torch, and redis-server and clamd on PATH
(`make system-deps`). `--device cpu --size tiny` runs every step on a CPU, as a smoke run: its
figures mean nothing.

    .venv/bin/python -m bench.gpu_graph [--device cuda] [--size full] [--requests 384] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from bench.stack import BENCH_PLAN, Stack, with_bench_plan
from deployments.backends.base import SAMPLE_RATE, AlignmentJob
from tests.support.audio import encode, tone
from tests.support.cluster import ROOT, application_from_yaml, deployment_of, start_ray, start_serve
from tests.support.tiny_qwen3 import FULL_SIZE, TinyDimensions, write_tiny_checkpoint

TARGET_RATIO = 0.9
CLIP_SECONDS = 3.0
TRANSCRIPT = "amongst her friends she was considered beautiful"
GPU_CONFIG = ROOT / "configs" / "serve.gpu.yaml"


def graph_application(checkpoint: Path, device: str, dtype: str) -> dict:
    """serve.gpu.yaml's application on one machine: one GPU replica, fixed replica counts."""

    def edit(app: dict) -> None:
        with_bench_plan(app)["args"].update(qwen3_model=str(checkpoint), qwen3_device=device, qwen3_dtype=dtype)
        # The CPU side sized for 16 cores, so the Aligner's GPU is what the graph waits for.
        replicas = {"Ingress": 4, "Scanner": 6, "JobRunner": 1, "Aligner": 1} if device != "cpu" else {"Ingress": 1, "Scanner": 1, "JobRunner": 1, "Aligner": 1}
        for name, count in replicas.items():
            deployment_of(app, name)["autoscaling_config"].update(min_replicas=count, max_replicas=count)
        if device == "cpu":
            deployment_of(app, "Aligner")["ray_actor_options"].update(num_gpus=0, num_cpus=1)
            for name in ("Ingress", "Scanner"):
                deployment_of(app, name)["ray_actor_options"].update(num_cpus=0.25)

    return application_from_yaml("aligner", "/", edit, config=GPU_CONFIG)


def run_graph(url: str, key: str, audio: bytes, requests: int, concurrency: int) -> float:
    """Requests per second through the graph (all must succeed)."""
    with httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {key}"}) as client:

        def post(_: int) -> None:
            response = client.post("/v1/align", files={"audio": ("clip.wav", audio)}, data={"text": TRANSCRIPT})
            response.raise_for_status()

        for _ in range(3):
            post(0)
        with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
            started = time.perf_counter()
            list(pool.map(post, range(requests)))
            return requests / (time.perf_counter() - started)


def aligner_batches() -> Counter:
    from ray import serve

    return Counter(serve.get_deployment_handle("Aligner", app_name="aligner").batch_sizes.remote().result())


def in_process(checkpoint: Path, device: str, dtype: str, batches: Counter, repetitions: int) -> float:
    """Jobs per second of the same model, in this process, on batches of the sizes the graph formed."""
    from deployments.backends.qwen3 import Qwen3Backend

    backend = Qwen3Backend(str(checkpoint), dtype=dtype, device=device)
    samples = tone(CLIP_SECONDS, SAMPLE_RATE)[0].astype(np.float32)
    job = AlignmentJob(samples, tuple(TRANSCRIPT.split()), "English")
    backend.align_batch([job] * max(batches))  # warm-up: kernels, allocator
    timings = []
    for _ in range(repetitions):
        started = time.perf_counter()
        for size, count in batches.items():
            for _ in range(count):
                backend.align_batch([job] * size)
        timings.append(time.perf_counter() - started)
    return sum(size * count for size, count in batches.items()) / statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (a smoke run)")
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--requests", type=int, default=384)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repetitions", type=int, default=3, help="of the in-process replay")
    arguments = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    dtype = "bfloat16" if arguments.device.startswith("cuda") else "float32"

    started = time.perf_counter()
    dims = FULL_SIZE if arguments.size == "full" else TinyDimensions()
    checkpoint = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="qwen3-random-")), dims, dtype=dtype)
    print(f"{arguments.size} random-weight checkpoint written in {time.perf_counter() - started:.0f} s")

    stack = Stack()
    key = stack.api_key(BENCH_PLAN)
    start_ray(num_cpus=8 if arguments.device == "cpu" else 16)
    url = start_serve([graph_application(checkpoint, arguments.device, dtype)])
    audio = encode(tone(CLIP_SECONDS, SAMPLE_RATE), SAMPLE_RATE, "wav")
    before = aligner_batches()
    graph_rps = run_graph(url, key, audio, arguments.requests, arguments.concurrency)
    batches = aligner_batches() - before
    mean_batch = sum(size * count for size, count in batches.items()) / sum(batches.values())

    from ray import serve

    serve.shutdown()  # frees the GPU for the in-process model
    process_jps = in_process(checkpoint, arguments.device, dtype, batches, arguments.repetitions)
    ratio = graph_rps / process_jps
    print(f"graph: {graph_rps:.1f} requests/s at concurrency {arguments.concurrency}, mean batch {mean_batch:.2f} {dict(sorted(batches.items()))}")
    print(f"in-process, the same batches: {process_jps:.1f} jobs/s")
    print(f"graph / in-process = {ratio:.2f}  (target >= {TARGET_RATIO}: {'PASS' if ratio >= TARGET_RATIO else 'FAIL'})")
    print(f"whole run {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
