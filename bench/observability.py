"""Cost of the ingress's metrics and audit lines per request. Target (issue 6): <= 0.5 ms p50 added.

    .venv/bin/python -m bench.observability [--iterations 20000]

What one successful POST /v1/align makes the Ingress replica record, call for call
(deployments/ingress.py, serve_app/api/gate.py):
- 5 counter increments: the request (middleware); rate-limit decisions for the pre-auth, request and
  audio-seconds buckets (Gate._enforce); the aligned audio seconds;
- 8 histogram observations: the total (middleware) and the auth, upload, scan, align and three
  limit stages, each through metrics.timed;
- 2 audit lines, to a file as in production: authentication allowed, scan clean.
The Scanner's and Aligner's metrics are recorded in their own replicas, off the ingress's path.

It runs in one process with a local Ray cluster started (tests.support.cluster.start_ray), so the
metrics are Ray's real ones feeding Ray's exporter; at the end it checks that the exporter shows
them. Each iteration times the sequence ("on") and, right after, the same timing harness with the
sequence removed ("off": what the ingress does with observability taken out is nothing, and the
timer's own cost cancels); the figure is the paired difference.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from serve_app import metrics
from serve_app.security.audit import AuditContext, AuditLog
from tests.support.cluster import metrics_url, start_ray

TARGET_P50_MS = 0.5
EXPORT_WAIT_S = 30.0
CONTEXT = AuditContext(
    request_id="3f0c2a9e5b7d4e1f8a6c0b2d4e6f8a1c", client_ip="203.0.113.7", route="/v1/align", principal_id="Ab3dE5gH7jK9"
)


def one_request(audit: AuditLog) -> None:
    """The ingress's observability calls for one successful alignment, in the order it makes them."""
    started = time.perf_counter()
    with metrics.timed("limit"):  # admit: pre-auth bucket
        metrics.RATELIMIT_DECISIONS.inc(tags={"policy": "pre-auth", "result": "allowed"})
    with metrics.timed("auth"):
        pass
    audit.record(CONTEXT, "auth", "allowed", "authenticated", method="api_key", plan="standard")
    with metrics.timed("limit"):  # request bucket
        metrics.RATELIMIT_DECISIONS.inc(tags={"policy": "requests", "result": "allowed"})
    with metrics.timed("upload"):
        pass
    with metrics.timed("scan"):
        pass
    audit.record(
        CONTEXT, "scan", "allowed", "clean", upload_bytes=92_844, decoded_seconds=2.904, container="wav", declared_type="audio/wav"
    )
    with metrics.timed("limit"):  # audio-seconds bucket
        metrics.RATELIMIT_DECISIONS.inc(tags={"policy": "audio-seconds", "result": "allowed"})
    with metrics.timed("align"):
        pass
    metrics.AUDIO_SECONDS.inc(2.904, tags={"backend": "pocketsphinx"})
    metrics.REQUESTS.inc(tags={"route": "/v1/align", "status": "200"})
    metrics.STAGE_SECONDS.observe(time.perf_counter() - started, tags={"stage": "total"})


def paired_samples_ms(audit: AuditLog, iterations: int) -> tuple[list[float], list[float]]:
    on_ms, off_ms = [], []
    for _ in range(iterations):
        started = time.perf_counter()
        one_request(audit)
        on_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        off_ms.append((time.perf_counter() - started) * 1000)
    return on_ms, off_ms


def percentiles(samples_ms: list[float]) -> tuple[float, float]:
    ordered = sorted(samples_ms)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]


def exported_requests() -> float:
    """This process's count of successful alignments as Ray's Prometheus endpoint shows it."""
    text = httpx.get(metrics_url(), timeout=10).text
    wanted = {"route": "/v1/align", "status": "200"}
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "ray_aligner_requests_total" and wanted.items() <= sample.labels.items()
    )


def wait_for_export(expected: int) -> float:
    deadline = time.monotonic() + EXPORT_WAIT_S
    while (counted := exported_requests()) < expected and time.monotonic() < deadline:
        time.sleep(1.0)
    return counted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    arguments = parser.parse_args()

    start_ray()
    with tempfile.TemporaryDirectory() as directory:
        audit_path = Path(directory) / "audit.jsonl"
        audit = AuditLog(path=str(audit_path))
        paired_samples_ms(audit, 500)  # warm up: first records register the series with Ray
        on_ms, off_ms = paired_samples_ms(audit, arguments.iterations)
        audit_lines = len(audit_path.read_text().splitlines())
    added_ms = [on - off for on, off in zip(on_ms, off_ms)]

    print(f"{arguments.iterations} requests; per request: 5 counter increments, 8 histogram observations, 2 audit lines (file sink)")
    for name, samples in (("on", on_ms), ("off", off_ms), ("added", added_ms)):
        p50, p99 = percentiles(samples)
        print(f"{name:6s} p50 {p50:.4f} ms  p99 {p99:.4f} ms")
    added_p50, _ = percentiles(added_ms)
    met = added_p50 <= TARGET_P50_MS
    print(f"target: added p50 <= {TARGET_P50_MS} ms: {'PASS' if met else 'FAIL'}")

    expected = 500 + arguments.iterations
    counted = wait_for_export(expected)
    exported = counted >= expected and audit_lines == 2 * expected
    print(f"recorded for real: Ray exported {counted:.0f}/{expected} requests, audit file holds {audit_lines}/{2 * expected} lines: "
          f"{'ok' if exported else 'NOT ok'}")  # fmt: skip
    return 0 if met and exported else 1


if __name__ == "__main__":
    raise SystemExit(main())
