"""Session fixtures: real Redis, real clamd, one real local Ray cluster and Serve for the whole run.

The graph is deployed from configs/serve.yaml itself (the same path `serve run` takes), twice:
- app "aligner" at "/" with the PocketSphinx backend (real offline alignment), two ingress
  replicas (limits must hold across replicas);
- app "qwen3" at "/qwen3" with the real qwen_asr loading and batched inference path on a tiny
  random-weight Qwen3-ForcedAligner checkpoint generated offline (its times are meaningless; its
  plumbing is real).
The test config trusts X-Forwarded-For from loopback, so a test can act as any client IP, and adds
plans for tests; everything else is the YAML as shipped.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from serve_app.security.api_keys import ApiKeyStore
from serve_app.security.redis_store import request_path_client


from tests.support.cluster import ROOT, application_from_yaml, deployment_of, start_ray, start_serve
from tools.local_services import ClamdServer, RedisServer

PEPPER = b"test-pepper-not-for-production-0001"

EVAL_DIR = ROOT.parent / "shared" / "eval" / "emuR_ae"
TEST_MAX_UPLOAD_BYTES = 4 * 1024 * 1024  # small, so the 413 tests stay quick
TEST_PLANS = {
    "unlimited": {"requests_burst": 100000, "requests_per_minute": 100000, "audio_seconds_burst": 1e7, "audio_seconds_per_hour": 1e7, "priority": 10},
    "five-requests": {"requests_burst": 5, "requests_per_minute": 0.001, "audio_seconds_burst": 1e6, "audio_seconds_per_hour": 1e6},
    "ten-audio-seconds": {"requests_burst": 1000, "requests_per_minute": 1000, "audio_seconds_burst": 10, "audio_seconds_per_hour": 0.001},
}


def _test_ingress(app: dict) -> dict:
    ingress = deployment_of(app, "Ingress")
    ingress["user_config"].update(
        trusted_proxies=["127.0.0.1/32"],
        plans={"standard": {}, "premium": {"priority": 5}, **TEST_PLANS},
        # The whole suite comes from loopback: its per-IP bucket must not be what tests measure.
        rate_limits={"pre_auth_burst": 100000, "pre_auth_per_minute": 100000},
    )
    return ingress


def _test_applications(tiny_checkpoint: Path) -> list[dict]:
    def pocketsphinx(app: dict) -> None:
        app["args"]["backend"] = "pocketsphinx"
        ingress = _test_ingress(app)
        ingress["user_config"]["max_upload_bytes"] = TEST_MAX_UPLOAD_BYTES
        ingress["autoscaling_config"].update(min_replicas=2, max_replicas=2)

    def tiny_qwen3(app: dict) -> None:
        app["args"].update(backend="qwen3", qwen3_model=str(tiny_checkpoint), qwen3_dtype="float32")
        _test_ingress(app)

    return [application_from_yaml("aligner", "/", pocketsphinx), application_from_yaml("qwen3", "/qwen3", tiny_qwen3)]


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
def ray_cluster(redis_server, clamd_server, audit_log_path):
    import ray

    # Replicas inherit the environment Ray starts with: point them at this session's services.
    os.environ["ALIGNER_REDIS_URL"] = redis_server.url
    os.environ["ALIGNER_CLAMD_ADDRESS"] = f"unix://{clamd_server.socket_path}"
    os.environ["ALIGNER_API_KEY_PEPPER"] = PEPPER.decode()
    os.environ["ALIGNER_AUDIT_LOG"] = str(audit_log_path)
    start_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from tests.support.tiny_qwen3 import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def serve_url(ray_cluster, tiny_checkpoint) -> str:
    """Base URL of the running graph; both applications are RUNNING when it returns."""
    from ray import serve

    yield start_serve(_test_applications(tiny_checkpoint))
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
    """A real key in the session's Redis, as `serve_app.cli keys create` would make it."""

    async def create() -> str:
        redis = request_path_client(redis_server.url)
        try:
            text, _ = await ApiKeyStore(redis, PEPPER).create(owner, scopes, plan, expires_in_s)
            return text
        finally:
            await redis.aclose()

    return asyncio.run(create())


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
