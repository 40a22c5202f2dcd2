"""POST /v1/align p50 on a 2.9 s clip: this checkout against a baseline commit, alternately, in one run.

Each round starts a fresh stack (Redis, clamd, Ray and Serve from that checkout's
configs/serve.yaml, PocketSphinx backend) for the baseline, a git worktree of `--baseline` next to
this checkout (so ../shared is found), run with this virtual environment, then one for this
checkout, and measures the p50 of `--requests` sequential requests for the dev clip msajc003
(bench.service's client and plan, which both checkouts have) after a warm-up. Target: this
checkout's median p50 within 5 % of the baseline's.

    .venv/bin/python -m bench.short_clip_regression --baseline af2cdfc [--rounds 3] [--requests 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.05

# Runs inside the checkout measured; only uses what the baseline has too.
_MEASURE = """
import json, logging, sys
logging.getLogger("httpx").setLevel(logging.WARNING)
import bench.service as service
from bench.stack import BENCH_PLAN, Stack, with_bench_plan
from tests.support.cluster import application_from_yaml, start_ray, start_serve
stack = Stack()
service.API_KEY = stack.api_key(BENCH_PLAN)
start_ray()
url = start_serve([application_from_yaml("aligner", "/", lambda app: with_bench_plan(app)["args"].update(backend="pocketsphinx"))])
audio = service.CLIP.read_bytes()
service.p50_latency(url, "/v1/align", audio, 1, 16)
print("P50", json.dumps(service.p50_latency(url, "/v1/align", audio, 1, int(sys.argv[1]))))
"""


def _p50(checkout: Path, requests: int) -> float:
    environment = {**os.environ, "PYTHONPATH": str(checkout)}
    finished = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(requests)], cwd=checkout, env=environment, capture_output=True, text=True, timeout=900
    )
    lines = [line for line in finished.stdout.splitlines() if line.startswith("P50 ")]
    if finished.returncode != 0 or not lines:
        raise RuntimeError(f"measuring {checkout} failed:\n{finished.stderr[-2000:]}")
    return json.loads(lines[-1][4:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    arguments = parser.parse_args()
    baseline = ROOT.parent / f"baseline-{arguments.baseline[:12]}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), arguments.baseline], check=True, capture_output=True)
    try:
        results: dict[str, list[float]] = {"baseline": [], "this": []}
        for round_number in range(arguments.rounds):
            for name, checkout in (("baseline", baseline), ("this", ROOT)):
                results[name].append(_p50(checkout, arguments.requests))
                print(f"round {round_number + 1}: {name:>8} p50 {results[name][-1] * 1000:.1f} ms", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False)
    ratios = [this / base for this, base in zip(results["this"], results["baseline"])]
    ratio = statistics.median(results["this"]) / statistics.median(results["baseline"])
    print(
        f"\nmedian p50: baseline {statistics.median(results['baseline']) * 1000:.1f} ms, this {statistics.median(results['this']) * 1000:.1f} ms;"
        f" ratio {ratio:.3f} (per round {min(ratios):.3f}-{max(ratios):.3f}; target <= {TARGET_RATIO})"
    )
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
