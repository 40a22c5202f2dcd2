"""A multi-node Ray cluster on one machine, built from cluster.yaml's node types (tests and bench/).

Each node is a raylet of its own (`ray.cluster_utils.Cluster`, the way Ray tests its own multi-node
behaviour): a head with cluster.yaml's head resources (CPU 0, no pool), CPU-pool nodes and GPU-pool
nodes with the resources of `cpu_workers` and `gpu_workers`. The GPU is a logical one: Ray counts
GPUs without touching a device, so an Aligner asking `num_gpus: 1` lands on a GPU-pool node here as
it would on a g6 instance. The graph is configs/serve.yaml's (PocketSphinx, local knobs) with each
replica asking what configs/serve.gpu.yaml asks (`ray_actor_options`: CPUs, GPU, pool marker).

One HTTP proxy, on the head (`proxy_location: HeadOnly`): every node here shares 127.0.0.1, so
per-node proxies would fight for one port. It stands where a load balancer would be in production.

`kill_node` is a node loss, not a shutdown: SIGKILL to the node's raylet and to every process under
it (its workers: the replicas, and its agents) at once, with no chance to drain.
"""

from __future__ import annotations

import copy
import os
import signal
import threading
import time
from dataclasses import dataclass

import httpx
import psutil
import yaml

from tests.support.cluster import ROOT, SERVE_YAML, free_port

CLUSTER_YAML = ROOT / "cluster.yaml"
SERVE_GPU_YAML = ROOT / "configs" / "serve.gpu.yaml"
NODE_OBJECT_STORE_BYTES = 100 * 1024 * 1024


def node_type_resources(node_type: str) -> dict:
    """The `resources` cluster.yaml declares for `node_type` (head, cpu_workers, gpu_workers)."""
    return dict(yaml.safe_load(CLUSTER_YAML.read_text())["available_node_types"][node_type]["resources"])


def _node_args(node_type: str) -> dict:
    resources = node_type_resources(node_type)
    return {
        "num_cpus": resources.pop("CPU", 0),
        "num_gpus": resources.pop("GPU", 0),
        "resources": resources,
        "object_store_memory": NODE_OBJECT_STORE_BYTES,
    }


APP = "aligner"
# The ingress's own deadline for an alignment (configs/serve.yaml): no request may hang past it.
ALIGN_TIMEOUT_S = next(d for d in yaml.safe_load(SERVE_YAML.read_text())["applications"][0]["deployments"] if d["name"] == "Ingress")["user_config"]["align_timeout_s"]
CLIP = ROOT.parent / "shared" / "eval" / "emuR_ae" / "msajc003.wav"
CLIP_TEXT = "amongst her friends she was considered beautiful"
# Autoscaling delays shortened from Serve's defaults (30 s up, 600 s down) so a load step shows
# Serve's and Ray's behaviour within a test; still longer than a replica takes to start here (~6 s
# on a loaded 2-core machine), so the delays, not the start, are what the figures compare against.
# Targets so that 8 clients clearly ask for the maximum and one client (or none) for the minimum.
# Serve's control loop decides every 0.1 s from the mean ongoing requests over look_back_period_s
# and restarts a delay whenever one decision wants no change, so a noisy mean near a target holds
# replicas: with a 2-5 s look-back, one client plus the ingresses' probes (load every second,
# dependencies every 2 s) crossed a Scanner target of 0.5, and at times 1.0, often enough to keep two
# scanners. 15 s smooths that (read from the controller: one client 0.1-0.5 across the scanners,
# eight 1.2-1.75 once the Aligner has scaled out; before that, with the Aligner the bottleneck, the
# scanners see little more than under one client) for a few seconds' lag.
FAST_AUTOSCALING = {
    "Scanner": {"target_ongoing_requests": 0.75, "upscale_delay_s": 15, "downscale_delay_s": 20, "look_back_period_s": 15, "metrics_interval_s": 0.5},
    "Aligner": {"target_ongoing_requests": 2, "upscale_delay_s": 15, "downscale_delay_s": 20, "look_back_period_s": 15, "metrics_interval_s": 0.5},
}
# The load step's replica ranges (min, max): the test's and bench/multinode.py's.
STEP_REPLICAS = {"Scanner": (1, 2), "Aligner": (1, 2)}


def pool_graph(counts: dict[str, int | tuple[int, int]], autoscaling: dict[str, dict] | None = None) -> dict:
    """configs/serve.yaml's graph (PocketSphinx) as it is placed in production, with these replica counts."""
    from bench.stack import with_bench_plan
    from tests.support.cluster import application_from_yaml

    def on_pools(app: dict) -> None:
        app["args"]["backend"] = "pocketsphinx"
        with_bench_plan(production_placement(app))
        replica_counts(app, counts)
        for deployment in app["deployments"]:
            deployment["autoscaling_config"].update((autoscaling or {}).get(deployment["name"], {}))

    return application_from_yaml(APP, "/", on_pools)


def production_placement(app: dict) -> dict:
    """Give each deployment of `app` the `ray_actor_options` configs/serve.gpu.yaml gives it."""
    (gpu_app,) = yaml.safe_load(SERVE_GPU_YAML.read_text())["applications"]
    asked = {deployment["name"]: deployment["ray_actor_options"] for deployment in gpu_app["deployments"]}
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = copy.deepcopy(asked[deployment["name"]])
    return app


class PoolCluster:
    """Head + CPU-pool + GPU-pool raylets on loopback; the driver (this process) connects to the head."""

    def __init__(self, cpu_nodes: int = 2, gpu_nodes: int = 2) -> None:
        self._shape = {"cpu_workers": cpu_nodes, "gpu_workers": gpu_nodes}
        self._cluster = None
        self.node_types: dict[str, str] = {}  # node id -> node type
        self.dashboard_url = ""

    def start(self) -> "PoolCluster":
        import ray
        from ray.cluster_utils import Cluster

        dashboard_port = free_port()
        head = {
            **_node_args("head"),
            "include_dashboard": True,  # Ray's state API (placement checks) is served by the dashboard
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
        }
        self._cluster = Cluster(initialize_head=True, head_node_args=head)
        self.node_types[self._cluster.head_node.node_id] = "head"
        for node_type, count in self._shape.items():
            for _ in range(count):
                self.add_node(node_type)
        self._cluster.wait_for_nodes()
        ray.init(address=self._cluster.address, logging_level="ERROR", log_to_driver=False)
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        return self

    def add_node(self, node_type: str, environment: dict[str, str] | None = None):
        """A node of `node_type`; its processes (and so its replicas) get `environment` over this process's."""
        saved = dict(os.environ)
        os.environ.update(environment or {})
        try:
            node = self._cluster.add_node(**_node_args(node_type))
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.node_types[node.node_id] = node_type
        return node

    def nodes_of(self, node_type: str) -> list:
        return [node for node in self._cluster.worker_nodes if self.node_types[node.node_id] == node_type]

    def kill_node(self, node) -> None:
        """SIGKILL the node's raylet and everything under it at once (a lost machine, not a drain)."""
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        victims = [raylet, *raylet.children(recursive=True)]
        for process in victims:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=10)
        self._cluster.remove_node(node, allow_graceful=False)  # the node's remaining processes (none should be left)

    def replica_nodes(self) -> dict[str, list[str]]:
        """Deployment name -> the node type of each live replica, from Ray's state API."""
        placement: dict[str, list[str]] = {}
        for actor in self._alive():
            if actor.class_name.startswith("ServeReplica:"):
                deployment = actor.class_name.rsplit(":", 1)[1]
                placement.setdefault(deployment, []).append(self.node_types.get(actor.node_id, "unknown"))
        return {name: sorted(types) for name, types in placement.items()}

    def replicas_on(self, node, deployment: str) -> int:
        """Live replicas of `deployment` on `node`."""
        return len(self._alive(("node_id", "=", node.node_id), ("class_name", "=", f"ServeReplica:{APP}:{deployment}")))

    def live_actors(self, class_name: str) -> list:
        """Ray's state records (pid, node_id, ...) of the live actors of `class_name`."""
        return self._alive(("class_name", "=", class_name))

    def actors_on_head(self) -> list[str]:
        """The class of every live actor on the head node."""
        return [actor.class_name for actor in self._alive(("node_id", "=", self._cluster.head_node.node_id))]

    def _alive(self, *filters: tuple[str, str, str]) -> list:
        from ray.util.state import list_actors

        return list_actors(address=self.dashboard_url, filters=[("state", "=", "ALIVE"), *filters], limit=1000)

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None


def wait_for(condition, timeout_s: float, interval_s: float = 0.5, what: str = "condition", state=None):
    """Poll `condition` until it returns a truthy value; that value, or TimeoutError naming `what` (and `state()`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    seen = f"; last seen: {state()}" if state is not None else ""
    raise TimeoutError(f"{what} not reached within {timeout_s} s{seen}")


def replica_counts(app: dict, counts: dict[str, int | tuple[int, int]]) -> dict:
    """Fix each named deployment's replicas (`n`) or its autoscaling range (`(min, max)`)."""
    for deployment in app["deployments"]:
        count = counts.get(deployment["name"])
        if count is not None:
            low, high = count if isinstance(count, tuple) else (count, count)
            deployment.setdefault("autoscaling_config", {}).update(min_replicas=low, max_replicas=high)
    return app


def start_serve_on_head(http_options: dict) -> str:
    """Serve with its one HTTP proxy on the head, on a free loopback port; the URL."""
    from ray import serve

    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={**http_options, "host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def running_replicas(app_name: str) -> dict[str, int]:
    """Deployment -> replicas Serve reports RUNNING."""
    from ray import serve

    status = serve.status().applications.get(app_name)
    if status is None:
        return {}
    return {name: deployment.replica_states.get("RUNNING", 0) for name, deployment in status.deployments.items()}


@dataclass(frozen=True)
class Outcome:
    started: float  # time.monotonic()
    seconds: float
    status: int  # 0: no answer (the client gave up or the connection broke)
    retry_after: str | None
    problem_type: str | None


class Load:
    """`clients` threads, each posting one clip to POST /v1/align after another until stopped."""

    def __init__(self, url: str, api_key: str, audio: bytes, text: str, clients: int, timeout_s: float) -> None:
        self._request = (url, api_key, audio, text, timeout_s)
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        return self.outcomes

    def successes_since(self, moment: float) -> int:
        return sum(1 for outcome in list(self.outcomes) if outcome.started >= moment and outcome.status == 200)

    def _client(self) -> None:
        url, api_key, audio, text, timeout_s = self._request
        with httpx.Client(base_url=url, timeout=timeout_s, headers={"Authorization": f"Bearer {api_key}"}) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = client.post("/v1/align", files={"audio": ("clip.wav", audio)}, data={"text": text})
                except httpx.HTTPError:
                    self.outcomes.append(Outcome(started, time.monotonic() - started, 0, None, None))
                    continue
                problem = response.json().get("type") if response.headers.get("content-type", "").startswith("application/problem+json") else None
                self.outcomes.append(Outcome(started, time.monotonic() - started, response.status_code, response.headers.get("retry-after"), problem))
