"""Every custom metric, defined in one place.

Each replica runs in its own process, so a prometheus-client registry per process would show one
replica's numbers. These are Ray metrics (`ray.util.metrics`): Ray aggregates them per node and
exports them on its Prometheus endpoint (`--metrics-export-port`) as `ray_aligner_*`, next to the
built-in `ray_serve_*` families. Each deployment calls `label_with_replica()` first thing in its
constructor, which adds the application/deployment/replica labels; outside a replica they are empty.

Labels are low-cardinality by construction: route templates, status codes, reason codes, policy and
dependency names. Never a key id, a client IP, a principal or a path with an id in it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from ray.serve import context as serve_context
from ray.util.metrics import Counter, Gauge, Histogram

# Labels every metric carries besides its own: which replica recorded it (as ray_serve_* name them).
REPLICA_TAG_KEYS = ("application", "deployment", "replica")


def _tags(*own: str) -> tuple[str, ...]:
    return (*own, *REPLICA_TAG_KEYS)


_LATENCY_BOUNDARIES_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]

REQUESTS = Counter("aligner_requests", "HTTP requests answered by the ingress.", tag_keys=_tags("route", "status"))
STAGE_SECONDS = Histogram(
    "aligner_stage_seconds",
    "Time spent in each stage of the request path (auth, limit, upload, scan, align, total).",
    boundaries=_LATENCY_BOUNDARIES_S,
    tag_keys=_tags("stage"),
)
AUTH_FAILURES = Counter("aligner_auth_failures", "Rejected credentials.", tag_keys=_tags("method", "reason"))
API_KEY_STALE_SERVES = Counter(
    "aligner_api_key_stale_serves",
    "API keys accepted from a replica's stale copy because Redis was unreachable (api_key_stale_s).",
    tag_keys=_tags(),
)
RATELIMIT_DECISIONS = Counter(
    "aligner_ratelimit_decisions",
    "Rate-limit decisions (allowed, denied, error_allowed, error_denied; refunded, refund_failed).",
    tag_keys=_tags("policy", "result"),
)
SHED = Counter("aligner_shed", "Requests shed under load before queueing.", tag_keys=_tags("plan"))
LOAD_PROBE_FAILURES = Counter(
    "aligner_load_probe_failures",
    "Shedder load probes that failed or did not answer in time (counted, never read as load).",
    tag_keys=_tags("error"),
)
BANS = Counter("aligner_bans", "Temporary bans set or enforced.", tag_keys=_tags("subject", "action"))
SCANNER_VERDICTS = Counter(
    "aligner_scanner_verdicts", "Scanner outcomes: clean, malware, rejected, unavailable.", tag_keys=_tags("verdict")
)
DECODE_REJECTIONS = Counter("aligner_decode_rejections", "Uploads refused by sniffing or decoding.", tag_keys=_tags("reason"))
AUDIO_SECONDS = Counter("aligner_audio_seconds", "Decoded audio seconds aligned.", tag_keys=_tags("backend"))
BATCH_SIZE = Histogram(
    "aligner_batch_size", "Jobs per aligner batch.", boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64], tag_keys=_tags("backend")
)
BATCH_QUEUE_SECONDS = Histogram(
    "aligner_batch_queue_seconds",
    "Time a job waited in the aligner for its batch to start (behind the batch running), by work: request or background.",
    boundaries=_LATENCY_BOUNDARIES_S,
    tag_keys=_tags("backend", "work"),
)
BACKEND_FAILURES = Counter(
    "aligner_backend_failures",
    "Jobs the aligner backend failed on (an exception, out of memory), by exception class.",
    tag_keys=_tags("backend", "error"),
)
INFERENCE_SECONDS = Histogram(
    "aligner_inference_seconds", "Backend time per batch.", boundaries=_LATENCY_BOUNDARIES_S, tag_keys=_tags("backend")
)
DEPENDENCY_UP = Gauge("aligner_dependency_up", "1 when the dependency answered its last probe.", tag_keys=_tags("dependency"))
DEPENDENCY_ERRORS = Counter(
    "aligner_dependency_errors", "Calls to a dependency that failed.", tag_keys=_tags("dependency", "use")
)
_JOB_BOUNDARIES_S = [0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400]
JOBS = Counter(
    "aligner_jobs", "Job lifecycle events: submitted, started, redelivered, succeeded, failed, cancelled, deleted, expired.",
    tag_keys=_tags("event"),
)
JOBS_BY_STATE = Gauge("aligner_jobs_by_state", "Jobs queued and running, all owners (from Redis).", tag_keys=_tags("state"))
JOB_QUEUE_DEPTH = Gauge("aligner_job_queue_depth", "Job stream entries not yet acknowledged (waiting or being worked on).", tag_keys=_tags())
JOB_QUEUE_SECONDS = Histogram("aligner_job_queue_seconds", "Time from submission to a job's first start.", boundaries=_JOB_BOUNDARIES_S, tag_keys=_tags())
JOB_RESULT_SECONDS = Histogram(
    "aligner_job_result_seconds", "Time from submission to a job's end, by terminal status.", boundaries=_JOB_BOUNDARIES_S, tag_keys=_tags("status")
)
JOB_WINDOW_RETRIES = Counter("aligner_job_window_retries", "Job windows retried after the aligner failed on our side.", tag_keys=_tags())

_ALL = (
    REQUESTS, STAGE_SECONDS, AUTH_FAILURES, API_KEY_STALE_SERVES, RATELIMIT_DECISIONS, SHED, LOAD_PROBE_FAILURES, BANS,
    SCANNER_VERDICTS, DECODE_REJECTIONS, AUDIO_SECONDS, BATCH_SIZE, BATCH_QUEUE_SECONDS, BACKEND_FAILURES, INFERENCE_SECONDS, DEPENDENCY_UP,
    DEPENDENCY_ERRORS, JOBS, JOBS_BY_STATE, JOB_QUEUE_DEPTH, JOB_QUEUE_SECONDS, JOB_RESULT_SECONDS, JOB_WINDOW_RETRIES,
)  # fmt: skip


def _label_all(tags: dict[str, str]) -> None:
    for metric in _ALL:
        metric.set_default_tags(tags)


_label_all(dict.fromkeys(REPLICA_TAG_KEYS, ""))  # recordable outside a replica too (bench/, unit tests)


def label_with_replica() -> None:
    """Label this process's metrics with its Serve replica. Call it first in a deployment's __init__.

    Why not ray.serve.metrics, which does this itself: it reads the replica context when a metric
    is constructed, and these are constructed when this module is imported, which in a replica is
    before the context exists (the deployment class is unpickled first). They were exported with no
    application/deployment/replica labels at all.
    """
    replica = serve_context._get_internal_replica_context()
    if replica is None:
        return
    label_process(replica.app_name or "", replica.deployment, replica.replica_tag)


def label_process(application: str, deployment: str, replica: str) -> None:
    """Label every metric this process records (label_with_replica in replicas; a test driver that
    runs deployment code in-process names itself, so its series are never mistaken for a replica's)."""
    _label_all({"application": application, "deployment": deployment, "replica": replica})


@contextmanager
def timed(stage: str) -> Iterator[None]:
    """Observe the block's duration as aligner_stage_seconds{stage=...}, even when it raises."""
    started = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS.observe(time.perf_counter() - started, tags={"stage": stage})
