"""Session fixtures: one real local Ray cluster and Serve instance for the whole test run.

The graph is deployed from configs/serve.yaml itself (the same path `serve run` takes), twice:
- app "aligner" at "/" with the PocketSphinx backend (real offline alignment);
- app "qwen3" at "/qwen3" with the real qwen_asr loading and batched inference path on a tiny
  random-weight Qwen3-ForcedAligner checkpoint generated offline (its times are meaningless; its
  plumbing is real).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.support.cluster import ROOT, application_from_yaml, deployment_of, start_ray, start_serve
from tools.local_services import ClamdServer, RedisServer

EVAL_DIR = ROOT.parent / "shared" / "eval" / "emuR_ae"
TEST_MAX_UPLOAD_BYTES = 4 * 1024 * 1024  # small, so the 413 tests stay quick


def _test_applications(tiny_checkpoint: Path) -> list[dict]:
    def pocketsphinx(app: dict) -> None:
        app["args"]["backend"] = "pocketsphinx"
        deployment_of(app, "Ingress")["user_config"]["max_upload_bytes"] = TEST_MAX_UPLOAD_BYTES

    def tiny_qwen3(app: dict) -> None:
        app["args"].update(backend="qwen3", qwen3_model=str(tiny_checkpoint), qwen3_dtype="float32")

    return [application_from_yaml("aligner", "/", pocketsphinx), application_from_yaml("qwen3", "/qwen3", tiny_qwen3)]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
    """A real redis-server for the session; tests that stop it must start it again."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def clamd_server(tmp_path_factory) -> ClamdServer:
    """A real clamd with the generated test signatures (EICAR, project marker)."""
    server = ClamdServer(tmp_path_factory.mktemp("clamd")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(redis_server, clamd_server):
    import os

    import ray

    # Replicas inherit the environment Ray starts with: point them at this session's services.
    os.environ["ALIGNER_REDIS_URL"] = redis_server.url
    os.environ["ALIGNER_CLAMD_ADDRESS"] = f"unix://{clamd_server.socket_path}"
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


@pytest.fixture(scope="session")
def client(serve_url):
    with httpx.Client(base_url=serve_url, timeout=120) as session:
        yield session


@pytest.fixture(scope="session")
def eval_utterances() -> list[dict]:
    return json.loads((EVAL_DIR / "reference.json").read_text())["utterances"]
