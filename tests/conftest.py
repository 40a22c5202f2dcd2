"""Session fixtures: one real local Ray cluster and Serve instance for the whole test run.

The graph is deployed from configs/serve.yaml itself (the same path `serve run` takes), twice:
- app "aligner" at "/" with the PocketSphinx backend (real offline alignment);
- app "qwen3" at "/qwen3" with the real qwen_asr loading and batched inference path on a tiny
  random-weight Qwen3-ForcedAligner checkpoint generated offline (its times are meaningless; its
  plumbing is real).
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest
import yaml

# Decide Ray's environment before it is imported anywhere.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only test cluster; see README
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import httpx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVAL_DIR = ROOT.parent / "shared" / "eval" / "emuR_ae"
SERVE_YAML = ROOT / "configs" / "serve.yaml"
DEPLOY_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _test_applications(tiny_checkpoint: Path) -> list[dict]:
    config = yaml.safe_load(SERVE_YAML.read_text())
    (base,) = config["applications"]
    sphinx = copy.deepcopy(base)
    sphinx["args"]["backend"] = "pocketsphinx"
    ingress = next(deployment for deployment in sphinx["deployments"] if deployment["name"] == "Ingress")
    ingress["user_config"]["max_upload_bytes"] = 4 * 1024 * 1024  # small, so the 413 tests stay quick
    qwen3 = copy.deepcopy(base)
    qwen3.update(name="qwen3", route_prefix="/qwen3")
    qwen3["args"].update(backend="qwen3", qwen3_model=str(tiny_checkpoint), qwen3_dtype="float32")
    return [sphinx, qwen3]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray-t-", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray.init(
        address="local",
        num_cpus=4,  # logical: replicas ask for fractions; the machine has 2 cores
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        _temp_dir=temp_dir,
        logging_level="ERROR",
    )
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
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # The same call `serve run configs/serve.yaml` makes (ray.serve.scripts.run).
    schema = ServeDeploySchema(applications=_test_applications(tiny_checkpoint))
    _get_global_client().deploy_apps(schema, _blocking=False)
    _wait_running({app.name for app in schema.applications})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _wait_running(names: set[str]) -> None:
    from ray import serve

    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while time.monotonic() < deadline:
        statuses = {name: serve.status().applications.get(name) for name in names}
        states = {name: status.status if status else "MISSING" for name, status in statuses.items()}
        if all(state == "RUNNING" for state in states.values()):
            return
        failed = {name: statuses[name].message for name, state in states.items() if state == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"deploy failed: {failed}")
        time.sleep(1)
    raise TimeoutError(f"applications not running after {DEPLOY_TIMEOUT_S} s: {states}")


@pytest.fixture(scope="session")
def client(serve_url):
    with httpx.Client(base_url=serve_url, timeout=120) as session:
        yield session


@pytest.fixture(scope="session")
def eval_utterances() -> list[dict]:
    import json

    return json.loads((EVAL_DIR / "reference.json").read_text())["utterances"]
