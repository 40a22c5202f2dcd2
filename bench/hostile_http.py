"""The hostile corpus through the real graph: how fast each upload is refused, and the scanner
replica's peak memory afterwards (issue 4: bombs refused in <= 200 ms; peak RSS < 500 MB).

Latency is measured at the client, so it includes Serve's hops and clamd; the scanner replica's
peak RSS is its kernel high-water mark (VmHWM), read from /proc once the corpus has run.

    .venv/bin/python -m bench.hostile_http
"""

from __future__ import annotations

import logging
import time

import httpx

from bench.stack import BENCH_PLAN, Stack, with_bench_plan
from tests.support.cluster import application_from_yaml, start_ray, start_serve
from tests.support.hostile import HOSTILE_CASES

TARGET_BOMB_MS = 200.0
TARGET_PEAK_RSS_MB = 500.0


def _peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stack = Stack()
    start_ray()
    url = start_serve([application_from_yaml("aligner", "/", lambda app: with_bench_plan(app)["args"].update(backend="pocketsphinx"))])
    from ray import serve

    scanner_pid = serve.get_deployment_handle("Scanner", app_name="aligner").pid.remote().result()

    print(f"{'case':<55} {'status':>6} {'ms':>8}")
    bomb_ms: list[float] = []
    for case in HOSTILE_CASES:
        upload = case.build()
        # A key per case: one malware hit rightly bans the key that sent it.
        headers = {"Authorization": f"Bearer {stack.api_key(BENCH_PLAN)}"}
        with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
            started = time.perf_counter()
            response = client.post("/v1/align", files={"audio": (case.filename, upload)}, data={"text": "hello"})
            elapsed_ms = (time.perf_counter() - started) * 1000
        if "1 h" in case.name:
            bomb_ms.append(elapsed_ms)
        print(f"{case.name:<55} {response.status_code:>6} {elapsed_ms:>8.1f}")

    peak = _peak_rss_mb(scanner_pid)
    print(f"\nslowest bomb refusal: {max(bomb_ms):.1f} ms (target <= {TARGET_BOMB_MS:.0f}): {'PASS' if max(bomb_ms) <= TARGET_BOMB_MS else 'FAIL'}")
    print(f"scanner replica peak RSS: {peak:.0f} MB (target < {TARGET_PEAK_RSS_MB:.0f}): {'PASS' if peak < TARGET_PEAK_RSS_MB else 'FAIL'}")


if __name__ == "__main__":
    main()
