"""Session fixtures: real Redis, real clamd, one real local Ray cluster and Serve for the whole run.

The graph is deployed from configs/serve.yaml itself (the same path `serve run` takes), twice:
- app "aligner" at "/" with the PocketSphinx backend (real offline alignment), two ingress
  replicas (limits must hold across replicas);
- app "qwen3" at "/qwen3" with the real qwen_asr loading and batched inference path on a tiny
  random-weight Qwen3-ForcedAligner checkpoint generated offline (its times are meaningless; its
  plumbing is real).
The test config trusts X-Forwarded-For from loopback, so a test can act as any client IP, adds
plans for tests, and trusts a loopback OAuth2 issuer (tests/support/issuer.py) started before the
apps. The "qwen3" app also gets small abuse thresholds, a short ban and low shedding thresholds, so
the traffic-control tests can trip them in seconds; everything else is the YAML as shipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from serve_app import metrics
from serve_app.security.api_keys import ApiKeyStore
from serve_app.security.redis_store import request_path_client


from tests.support import keys
from tests.support.cluster import ROOT, application_from_yaml, deployment_of, point_replicas_at, start_ray, start_serve
from tests.support.issuer import AUDIENCE, LoopbackIssuer
from tests.support.secrets_seen import remember
from tools.local_services import ClamdServer, RedisServer

PEPPER = b"test-pepper-not-for-production-0001"
DRIVER_APPLICATION = "pytest-driver"  # the application label of metrics this process records

EVAL_DIR = ROOT.parent / "shared" / "eval" / "emuR_ae"
TEST_MAX_UPLOAD_BYTES = 16 * 1024 * 1024  # small, so the 413 tests stay quick; a 5 min FLAC fits
TEST_QWEN3_WINDOW_S = 30.0  # "qwen3" app: a 5 min file takes many windows (tests/test_long_form.py)
TEST_PLANS = {
    "unlimited": {"requests_burst": 100000, "requests_per_minute": 100000, "audio_seconds_burst": 1e7, "audio_seconds_per_hour": 1e7, "priority": 10, "max_concurrent_requests": 1000},
    # max_concurrent_requests above the 20 parallel callers that drain it: only the bucket may refuse them.
    "five-requests": {"requests_burst": 5, "requests_per_minute": 0.001, "audio_seconds_burst": 1e6, "audio_seconds_per_hour": 1e6, "max_concurrent_requests": 50},
    # A bucket must hold the plan's longest audio (IngressOptions checks it), hence max_audio_seconds.
    "ten-audio-seconds": {"requests_burst": 1000, "requests_per_minute": 1000, "audio_seconds_burst": 10, "audio_seconds_per_hour": 0.001, "max_audio_seconds": 10},
    "hour-of-audio": {"requests_burst": 1000, "requests_per_minute": 1000, "audio_seconds_burst": 3600, "audio_seconds_per_hour": 0.001},
    "two-at-once": {"requests_burst": 1000, "requests_per_minute": 1000, "audio_seconds_burst": 1e6, "audio_seconds_per_hour": 1e6, "max_concurrent_requests": 2},
    "one-request-per-6s": {"requests_burst": 1, "requests_per_minute": 10, "audio_seconds_burst": 1e6, "audio_seconds_per_hour": 1e6},
    "two-jobs": {"requests_burst": 1000, "requests_per_minute": 1000, "audio_seconds_burst": 1e6, "audio_seconds_per_hour": 1e6, "max_active_jobs": 2},
}
# Job runners: a dead runner's jobs are redelivered within seconds, retries start at once.
TEST_JOB_RUNNER = {"lease_s": 6, "retry_backoff_s": 0.5, "expiry_sweep_s": 1}
TEST_QWEN3_JOB_RETENTION_S = 5.0  # "qwen3" app: ended jobs expire within the test that made them

# OAuth2 clients registered with the session's loopback issuer.
OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET = "batch-worker", "batch-worker-secret"
OAUTH_NO_ALIGN_CLIENT_ID = "reporting-worker"  # holds only a "reports" scope
# "qwen3" app only. Abuse: a handful of failures bans for seconds, not minutes. Shedding: one
# scanner slot busy (load 1/4) sheds priority 0; priority 10 is shed only at 5x capacity; a batch
# wait counts only when it reaches seconds (a loaded event loop, not a batch running, makes one).
TEST_ABUSE = {"max_auth_failures": 5, "ban_s": 5}
TEST_UPLOAD_IDLE_TIMEOUT_S = 2.0  # "qwen3" app: a silent upload is cut off within seconds
TEST_SHEDDING = {"shed_above": 0.2, "shed_top_priority_above": 5.0, "target_batch_wait_s": 5.0}


def _test_ingress(app: dict, oauth_issuer_url: str) -> dict:
    ingress = deployment_of(app, "Ingress")
    ingress["user_config"].update(
        trusted_proxies=["127.0.0.1/32"],
        plans={"standard": {}, "premium": {"priority": 5}, **TEST_PLANS},
        # The whole suite comes from loopback: its per-IP bucket must not be what tests measure.
        rate_limits={"pre_auth_burst": 100000, "pre_auth_per_minute": 100000},
        oauth={"issuers": [{"issuer": oauth_issuer_url, "audience": AUDIENCE}]},
    )
    return ingress


def _test_applications(tiny_checkpoint: Path, oauth_issuer_url: str) -> list[dict]:
    def pocketsphinx(app: dict) -> None:
        app["args"]["backend"] = "pocketsphinx"
        ingress = _test_ingress(app, oauth_issuer_url)
        ingress["user_config"]["max_upload_bytes"] = TEST_MAX_UPLOAD_BYTES
        ingress["autoscaling_config"].update(min_replicas=2, max_replicas=2)
        deployment_of(app, "JobRunner")["user_config"].update(TEST_JOB_RUNNER)

    def tiny_qwen3(app: dict) -> None:
        app["args"].update(
            backend="qwen3", qwen3_model=str(tiny_checkpoint), qwen3_dtype="float32", qwen3_max_audio_seconds=TEST_QWEN3_WINDOW_S
        )
        ingress = _test_ingress(app, oauth_issuer_url)
        ingress["user_config"].update(
            abuse=TEST_ABUSE, shedding=TEST_SHEDDING, upload_idle_timeout_s=TEST_UPLOAD_IDLE_TIMEOUT_S,
            jobs={"retention_s": TEST_QWEN3_JOB_RETENTION_S},
        )  # fmt: skip
        deployment_of(app, "JobRunner")["user_config"].update(TEST_JOB_RUNNER)

    return [application_from_yaml("aligner", "/", pocketsphinx), application_from_yaml("qwen3", "/qwen3", tiny_qwen3)]


def pytest_collection_modifyitems(items):
    """Multi-node tests first: one process drives one Ray cluster at a time, and theirs
    (tests/support/multinode.py) is shut down before the session's single-node cluster starts."""
    items.sort(key=lambda item: item.get_closest_marker("multinode") is None)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
    """A real redis-server for the session (data survives stop/start: tests stop it mid-run)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def private_redis_server(tmp_path) -> RedisServer:
    """A redis-server of the test's own, for tests that stop Redis without disturbing the others."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def clamd_server(tmp_path_factory) -> ClamdServer:
    """A real clamd with the generated test signatures (EICAR, project marker)."""
    server = ClamdServer(tmp_path_factory.mktemp("clamd")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def audit_log_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="session")
def spool_dir(tmp_path_factory) -> Path:
    """The replicas' spool (uploads, decoded PCM): tests check that requests leave nothing in it."""
    return tmp_path_factory.mktemp("spool") / "spool"


@pytest.fixture(scope="session")
def ray_cluster(redis_server, clamd_server, audit_log_path, spool_dir):
    import ray

    point_replicas_at(redis_server.url, clamd_server.socket_path, PEPPER.decode(), audit_log_path, spool_dir)
    start_ray()
    # Tests drive deployment code in-process too (tests/test_backend_failures.py): what this driver
    # records reaches the cluster's metrics, labelled as the driver's, not as a replica's.
    metrics.label_process(DRIVER_APPLICATION, "pytest", "driver")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from tests.support.tiny_qwen3 import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def oauth_issuer() -> LoopbackIssuer:
    """A real OAuth2 authorization server on loopback, trusted by both applications."""
    server = LoopbackIssuer().start()
    server.register_client(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, ("align",))
    server.register_client(OAUTH_NO_ALIGN_CLIENT_ID, OAUTH_CLIENT_SECRET, ("reports",))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def serve_url(ray_cluster, tiny_checkpoint, oauth_issuer) -> str:
    """Base URL of the running graph; both applications are RUNNING when it returns."""
    from ray import serve

    yield start_serve(_test_applications(tiny_checkpoint, oauth_issuer.issuer))
    serve.shutdown()


@pytest.fixture
def api_key_pepper() -> bytes:
    return PEPPER


@pytest_asyncio.fixture
async def redis_client(redis_server):
    """The request-path client an ingress replica uses (short timeouts, one retry)."""
    client = request_path_client(redis_server.url)
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def api_key_store(redis_client, api_key_pepper) -> ApiKeyStore:
    return ApiKeyStore(redis_client, api_key_pepper)


def create_api_key(redis_server: RedisServer, owner: str, scopes: list[str], plan: str, expires_in_s: float | None = None) -> str:
    """A real key in the session's Redis, remembered for tests/test_zz_no_secrets_in_logs.py."""
    return remember(keys.create_api_key(redis_server.url, PEPPER, owner, scopes, plan, expires_in_s))


@pytest.fixture(scope="session")
def align_key(redis_server) -> str:
    return create_api_key(redis_server, "test-suite", ["align"], "unlimited")


@pytest.fixture(scope="session")
def admin_key(redis_server) -> str:
    return create_api_key(redis_server, "test-admin", ["align", "admin"], "unlimited")


@pytest.fixture(scope="session")
def client(serve_url, align_key):
    with httpx.Client(base_url=serve_url, timeout=120, headers={"Authorization": f"Bearer {align_key}"}) as session:
        yield session


@pytest.fixture(scope="session")
def anonymous(serve_url):
    with httpx.Client(base_url=serve_url, timeout=120) as session:
        yield session


@pytest.fixture(scope="session")
def eval_utterances() -> list[dict]:
    return json.loads((EVAL_DIR / "reference.json").read_text())["utterances"]
