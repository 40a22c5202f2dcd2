"""Start one local Ray cluster and deploy applications from configs/serve.yaml (tests and bench/).

The applications are deployed with the same controller call `serve run configs/serve.yaml` makes
(`ray.serve.scripts.run` -> `deploy_apps`), so the YAML's deployment options are what runs.
Ray's Prometheus endpoint listens on a port chosen here (`metrics_url()`), and everything the
cluster logs lands under `logs_dir()`: the observability tests read both.
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

# Decide Ray's environment before it is imported anywhere (same choices as the Makefile).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "serve_app.proxy_middleware:proxy_middlewares")

ROOT = Path(__file__).resolve().parents[2]
SERVE_YAML = ROOT / "configs" / "serve.yaml"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def point_replicas_at(redis_url: str, clamd_socket: Path, pepper: str, audit_log: Path, spool_dir: Path) -> None:
    """Replicas inherit the environment their node starts with (serve_app.settings.Environment): set it first."""
    os.environ.update(
        ALIGNER_REDIS_URL=redis_url,
        ALIGNER_CLAMD_ADDRESS=f"unix://{clamd_socket}",
        ALIGNER_API_KEY_PEPPER=pepper,
        ALIGNER_AUDIT_LOG=str(audit_log),
        ALIGNER_SPOOL_DIR=str(spool_dir),
    )


_metrics_export_port: int | None = None


def start_ray(num_cpus: int = 4) -> None:
    import ray

    global _metrics_export_port
    temp_dir = tempfile.mkdtemp(prefix="ray-t-", dir="/tmp")  # short: Ray's socket paths are length-limited
    _metrics_export_port = free_port()
    ray.init(
        address="local",
        num_cpus=num_cpus,  # logical: replicas ask for fractions of the 2 real cores
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        _temp_dir=temp_dir,
        _metrics_export_port=_metrics_export_port,
        logging_level="ERROR",
    )


def metrics_url() -> str:
    """Ray's Prometheus endpoint for the cluster start_ray() started (custom and built-in families)."""
    import ray

    if _metrics_export_port is None:
        raise RuntimeError("start_ray() has not run in this process")
    return f"http://{ray.util.get_node_ip_address()}:{_metrics_export_port}/metrics"


def logs_dir() -> Path:
    """Where this cluster's processes log: replica logs under serve/, worker stdout/stderr, Ray's own."""
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())


def application_from_yaml(name: str, route_prefix: str, edit: Callable[[dict], None] | None = None, config: Path = SERVE_YAML) -> dict:
    """The application of `config` (configs/serve.yaml), renamed, re-routed and optionally edited."""
    (base,) = yaml.safe_load(config.read_text())["applications"]
    app = copy.deepcopy(base)
    app.update(name=name, route_prefix=route_prefix)
    if edit is not None:
        edit(app)
    return app


def deployment_of(app: dict, name: str) -> dict:
    return next(deployment for deployment in app["deployments"] if deployment["name"] == name)


def start_serve(applications: list[dict], timeout_s: float = 240, request_timeout_s: float | None = None) -> str:
    """Start Serve on a free loopback port, deploy `applications`, wait until all run; return the URL.

    `request_timeout_s` replaces the YAML's (benchmarks of hours of audio through POST /v1/align).
    """
    from ray import serve

    port = free_port()
    http_options = yaml.safe_load(SERVE_YAML.read_text())["http_options"]
    if request_timeout_s is not None:
        http_options["request_timeout_s"] = request_timeout_s
    serve.start(http_options={**http_options, "port": port})
    deploy(applications, timeout_s)
    return f"http://127.0.0.1:{port}"


def deploy(applications: list[dict], timeout_s: float = 240) -> None:
    """Make `applications` what Serve runs (the running ones unchanged stay up); wait until all run."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema(applications=applications)
    _get_global_client().deploy_apps(schema, _blocking=False)
    _wait_running({app.name for app in schema.applications}, timeout_s)


def _wait_running(names: set[str], timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        statuses = {name: serve.status().applications.get(name) for name in names}
        states = {name: status.status if status else "MISSING" for name, status in statuses.items()}
        if all(state == "RUNNING" for state in states.values()):
            return
        failed = {name: statuses[name].message for name, state in states.items() if state == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"deploy failed: {failed}")
        time.sleep(1)
    raise TimeoutError(f"applications not running after {timeout_s} s: {states}")
