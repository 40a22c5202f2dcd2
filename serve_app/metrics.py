"""Every custom metric, defined in one place.

Each replica runs in its own process, so a prometheus-client registry per process would show one
replica's numbers. These are Ray metrics (`ray.serve.metrics`): Ray aggregates them per node and
exports them on its Prometheus endpoint (`--metrics-export-port`) as `ray_aligner_*`, next to the
built-in `ray_serve_*` families, with application/deployment/replica tags added automatically.

Labels are low-cardinality by construction: route templates, status codes, reason codes, policy and
dependency names. Never a key id, a client IP, a principal or a path with an id in it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from ray.serve.metrics import Counter, Gauge, Histogram

_LATENCY_BOUNDARIES_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]

REQUESTS = Counter("aligner_requests", "HTTP requests answered by the ingress.", tag_keys=("route", "status"))
STAGE_SECONDS = Histogram(
    "aligner_stage_seconds",
    "Time spent in each stage of the request path (auth, limit, upload, scan, align, total).",
    boundaries=_LATENCY_BOUNDARIES_S,
    tag_keys=("stage",),
)
AUTH_FAILURES = Counter("aligner_auth_failures", "Rejected credentials.", tag_keys=("method", "reason"))
RATELIMIT_DECISIONS = Counter(
    "aligner_ratelimit_decisions", "Rate-limit decisions (allowed, denied, error_allowed, error_denied).", tag_keys=("policy", "result")
)
SHED = Counter("aligner_shed", "Requests shed under load before queueing.", tag_keys=("plan",))
BANS = Counter("aligner_bans", "Temporary bans set or enforced.", tag_keys=("subject", "action"))
SCANNER_VERDICTS = Counter(
    "aligner_scanner_verdicts", "Scanner outcomes: clean, malware, rejected, unavailable.", tag_keys=("verdict",)
)
DECODE_REJECTIONS = Counter("aligner_decode_rejections", "Uploads refused by sniffing or decoding.", tag_keys=("reason",))
AUDIO_SECONDS = Counter("aligner_audio_seconds", "Decoded audio seconds aligned.", tag_keys=("backend",))
BATCH_SIZE = Histogram(
    "aligner_batch_size", "Jobs per aligner batch.", boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64], tag_keys=("backend",)
)
INFERENCE_SECONDS = Histogram(
    "aligner_inference_seconds", "Backend time per batch.", boundaries=_LATENCY_BOUNDARIES_S, tag_keys=("backend",)
)
DEPENDENCY_UP = Gauge("aligner_dependency_up", "1 when the dependency answered its last probe.", tag_keys=("dependency",))
DEPENDENCY_ERRORS = Counter("aligner_dependency_errors", "Calls to a dependency that failed.", tag_keys=("dependency", "use"))


@contextmanager
def timed(stage: str) -> Iterator[None]:
    """Observe the block's duration as aligner_stage_seconds{stage=...}, even when it raises."""
    started = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS.observe(time.perf_counter() - started, tags={"stage": stage})
