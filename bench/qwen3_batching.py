"""Does batching pay? Qwen3Backend throughput, one batched call vs one call per job, on this CPU.

8 jobs of ~3 s audio (8 English words each) are aligned as one `align_batch` call and as 8 single-job
calls, several repetitions each; the median wall time of each gives audio seconds per wall second
and jobs per second. Target: batched throughput of the tiny model >= 1.5x single-call throughput.

The checkpoints are random-weight copies of the real architecture (tests.support.tiny_qwen3) at two
widths: "tiny" (the test checkpoint, where per-call overhead dominates) and "small" (wider and
deeper, where matrix work grows, which batching cannot shrink on a CPU core). Neither is the 0.6B
model: these figures say how much the batching path saves on this machine, not what a GPU replica
will do.

    .venv/bin/python -m bench.qwen3_batching [--repetitions 15] [--sizes tiny small] [--threads N]

On a busy shared machine, `--threads 1` gives steadier figures: torch's intra-op threads otherwise
wait on each other whenever another process holds a core, which penalises many small calls most.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from deployments.backends.base import SAMPLE_RATE, AlignmentJob
from deployments.backends.qwen3 import Qwen3Backend
from tests.support.tiny_qwen3 import TinyDimensions, write_tiny_checkpoint

TARGET_SPEEDUP = 1.5
JOBS = 8
JOB_SECONDS = 3.0
WORDS = ("she", "had", "your", "dark", "suit", "in", "greasy", "wash", "water", "all", "year")
SIZES = {
    "tiny": TinyDimensions(),
    "small": TinyDimensions(hidden_size=256, layers=4),
}


@dataclass(frozen=True)
class Throughput:
    median_seconds: float
    audio_seconds_per_second: float
    jobs_per_second: float


def make_jobs() -> list[AlignmentJob]:
    rng = np.random.default_rng(0)
    jobs = []
    for index in range(JOBS):
        # Slightly different lengths, as real requests have: the batch pads to the longest.
        samples = round((JOB_SECONDS + 0.1 * index) * SAMPLE_RATE)
        audio = (0.1 * rng.standard_normal(samples)).astype(np.float32)
        units = tuple(WORDS[(index + offset) % len(WORDS)] for offset in range(8))
        jobs.append(AlignmentJob(audio, units, "English"))
    return jobs


Runner = Callable[[list[AlignmentJob]], None]


def measure(runners: dict[str, Runner], jobs: list[AlignmentJob], repetitions: int) -> dict[str, Throughput]:
    """Median wall time per runner; runners alternate within each repetition so that load from
    other processes on this shared machine falls on both alike."""
    durations: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(repetitions):
        for label, run in runners.items():
            started = time.perf_counter()
            run(jobs)
            durations[label].append(time.perf_counter() - started)
    audio_seconds = sum(job.audio.shape[0] for job in jobs) / SAMPLE_RATE
    throughputs = {}
    for label, samples in durations.items():
        median = statistics.median(samples)
        throughputs[label] = Throughput(median, audio_seconds / median, len(jobs) / median)
    return throughputs


def bench_size(name: str, dims: TinyDimensions, repetitions: int, device: str, dtype: str) -> None:
    jobs = make_jobs()
    with tempfile.TemporaryDirectory(prefix=f"qwen3-{name}-") as directory:
        checkpoint = write_tiny_checkpoint(Path(directory), dims)
        weight_megabytes = (checkpoint / "model.safetensors").stat().st_size / 1e6
        backend = Qwen3Backend(str(checkpoint), dtype=dtype, device=device)

    def batched(batch: list[AlignmentJob]) -> None:
        backend.align_batch(batch)

    def one_by_one(batch: list[AlignmentJob]) -> None:
        for job in batch:
            backend.align_batch([job])

    runners = {"batch of 8": batched, "8 x single": one_by_one}
    for run in runners.values():
        run(jobs)  # warm-up: first calls pay for lazy initialisation in torch and the tokenizer
    throughputs = measure(runners, jobs, repetitions)
    together, alone = throughputs["batch of 8"], throughputs["8 x single"]
    speedup = together.audio_seconds_per_second / alone.audio_seconds_per_second
    if name == "tiny":  # the figure is for the tiny test model; "small" is context
        verdict = f"(target >= {TARGET_SPEEDUP}x): " + ("PASS" if speedup >= TARGET_SPEEDUP else "FAIL")
    else:
        verdict = "(no target: shows how batching fares as matrix work grows)"
    print(f"[{name}] hidden={dims.hidden_size} layers={dims.layers} weights={weight_megabytes:.1f} MB")
    for label, figures in throughputs.items():
        print(
            f"  {label}: median {figures.median_seconds * 1000:7.1f} ms, "
            f"{figures.audio_seconds_per_second:7.1f} audio s/s, {figures.jobs_per_second:6.1f} jobs/s"
        )
    print(f"  speedup {speedup:.2f}x {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=15)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "small"])
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{JOBS} jobs x ~{JOB_SECONDS:g} s audio, {args.repetitions} repetitions, median; "
        f"torch threads {torch.get_num_threads()}, {args.device} {args.dtype}"
    )
    for name in args.sizes:
        bench_size(name, SIZES[name], args.repetitions, args.device, args.dtype)


if __name__ == "__main__":
    main()
