"""What the Aligner's health check costs (issue 10, point 13): Serve calls `check_health` every
`health_check_period_s`, so it must stay cheap on a healthy replica.

Run from the repository root:  .venv/bin/python -m bench.aligner_health [--repeats N]

In-process, on the real PocketSphinx backend: the check on a healthy replica (no backend failure
streak: nothing to do), and the check after a failure streak (one probe inference of 1 s of quiet
noise, off the event loop, under the backend lock). Prints the median and range of N timed runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from deployments.aligner import Aligner
from deployments.backends.pocketsphinx import PocketSphinxBackend
from serve_app.settings import AlignerOptions, GraphArgs


async def _time(aligner: Aligner, streak: int, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        aligner._failure_streak = streak  # the state a run of failed jobs leaves behind
        started = time.perf_counter()
        await aligner.check_health()
        seconds.append(time.perf_counter() - started)
    return seconds


def _summary(name: str, seconds: list[float], unit: float, unit_name: str) -> str:
    values = [value / unit for value in seconds]
    return f"{name}: median {statistics.median(values):.3f} {unit_name} (range {min(values):.3f}-{max(values):.3f}, n={len(values)})"


async def main(repeats: int) -> None:
    options = AlignerOptions()
    aligner = Aligner.func_or_class(GraphArgs(backend="pocketsphinx"), backend=PocketSphinxBackend())
    aligner.reconfigure(options.model_dump())
    await _time(aligner, options.unhealthy_after_failures, 1)  # warm-up
    print(_summary("check_health, healthy replica", await _time(aligner, 0, repeats * 100), 1e-6, "us"))
    print(_summary("check_health after a failure streak (probe inference)", await _time(aligner, options.unhealthy_after_failures, repeats), 1e-3, "ms"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    asyncio.run(main(parser.parse_args().repeats))
