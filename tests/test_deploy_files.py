"""The deployment and monitoring files under deploy/ are well-formed and agree with the code.

- Every metric an alert or a dashboard panel queries is one the service exports (a custom metric of
  serve_app/metrics.py under the name Ray exports it with, or a Ray built-in family verified on a
  live Ray 2.60 scrape), and every label it filters or groups on is one that metric carries.
- The KubeRay RayService embeds exactly configs/serve.gpu.yaml, which passes the strict lint, and
  its environment, secrets, ports and resources line up with the code and the other manifests.
- Where promtool is installed: Prometheus' own config and rule checks, the alert unit tests
  (deploy/prometheus/alerts.test.yml) and a syntax check of every dashboard query.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml

from serve_app.config_lint import lint_serve_config

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
KUBERAY_DIR = ROOT / "deploy" / "kuberay"
DASHBOARD = ROOT / "deploy" / "grafana" / "forced-aligner.json"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"

# ---------------------------------------------------------------------------------------------
# What Ray 2.60 exports. Custom metrics: `ray_` + name; counters add `_total`; histograms export
# `_bucket` (with `le`), `_sum` and `_count`; replicas add application/deployment/replica tags.
# (Checked by scraping a Serve app that emitted every metric of serve_app/metrics.py.)

SERVE_REPLICA_TAGS = frozenset({"application", "deployment", "replica"})
# Added to every series: Ray's own resource attributes, and Prometheus' target labels.
RAY_PROCESS_LABELS = frozenset({"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "instance", "job"})
RAY_NODE_LABELS = frozenset({"ip", "IsHeadNode", "RayNodeType", "SessionName", "Version", "instance", "job"})
GPU_LABELS = RAY_NODE_LABELS | {"GpuIndex", "GpuDeviceName", "GpuUuid"}

# Built-in families the alerts and dashboard use: exported name -> (kind, labels). Serve families
# and their labels are from the same live scrape; node families from ray/dashboard/consts.py
# (NODE_TAG_KEYS, GPU_TAG_KEYS): no GPU here to scrape them.
RAY_BUILTIN_FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    "ray_serve_num_http_requests_total": ("counter", frozenset({"application", "route", "method", "status_code"})),
    "ray_serve_http_request_latency_ms": ("histogram", frozenset({"application", "route", "method", "status_code"})),
    "ray_serve_deployment_processing_latency_ms": ("histogram", SERVE_REPLICA_TAGS | {"route"}),
    "ray_serve_deployment_queued_queries": ("gauge", frozenset({"application", "deployment", "handle", "actor_id"})),
    "ray_serve_replica_processing_queries": ("gauge", SERVE_REPLICA_TAGS),
    "ray_serve_deployment_replica_healthy": ("gauge", SERVE_REPLICA_TAGS),
    "ray_serve_autoscaling_target_replicas": ("gauge", frozenset({"application", "deployment"})),
    "ray_serve_autoscaling_desired_replicas": ("gauge", frozenset({"application", "deployment"})),
    "ray_node_cpu_utilization": ("gauge", RAY_NODE_LABELS),
    "ray_node_gpus_utilization": ("gauge", GPU_LABELS),
    "ray_node_gram_used": ("gauge", GPU_LABELS),
}


def _series_of(family: str, kind: str, labels: frozenset[str]) -> dict[str, frozenset[str]]:
    if kind == "histogram":
        return {f"{family}_bucket": labels | {"le"}, f"{family}_sum": labels, f"{family}_count": labels}
    return {family: labels}


def custom_series() -> dict[str, frozenset[str]]:
    """Exported series name -> labels, for every metric defined in serve_app/metrics.py."""
    from ray.util.metrics import Counter, Histogram, Metric

    from serve_app import metrics

    series: dict[str, frozenset[str]] = {}
    for metric in vars(metrics).values():
        if not isinstance(metric, Metric):
            continue
        info = metric.info
        labels = frozenset(info["tag_keys"]) | SERVE_REPLICA_TAGS | RAY_PROCESS_LABELS
        if isinstance(metric, Counter):
            series.update(_series_of(f"ray_{info['name']}_total", "counter", labels))
        elif isinstance(metric, Histogram):
            series.update(_series_of(f"ray_{info['name']}", "histogram", labels))
        else:
            series.update(_series_of(f"ray_{info['name']}", "gauge", labels))
    return series


def known_series() -> dict[str, frozenset[str]]:
    series = custom_series()
    for family, (kind, labels) in RAY_BUILTIN_FAMILIES.items():
        series.update(_series_of(family, kind, labels | RAY_PROCESS_LABELS))
    return series


# ---------------------------------------------------------------------------------------------
# A small PromQL reader: enough to list the metrics, matcher labels and grouping labels of the
# expressions we write (no `__name__` matchers, no `offset`).

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_RANGE = re.compile(r"\[[^\]]*\]")
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_IDENTIFIER = re.compile(r"[a-zA-Z_:][\w:]*")
PROMQL_WORDS = frozenset(
    {"sum", "min", "max", "avg", "count", "rate", "increase", "histogram_quantile", "absent", "vector", "min_over_time"}
    | {"and", "or", "unless", "bool"}
)


def query_problems(expr: str, series: Mapping[str, frozenset[str]]) -> list[str]:
    """Unknown metrics, and labels a metric does not carry, in one PromQL (or label_values) query."""
    problems: list[str] = []
    used: set[str] = set()

    for metric, label in _LABEL_VALUES.findall(expr):
        used.add(metric)
        if metric in series and label not in series[metric]:
            problems.append(f"{metric} has no label {label!r}")
    expr = _LABEL_VALUES.sub(" ", expr)

    for metric, matchers in _SELECTOR.findall(expr):
        if not metric:
            problems.append(f"selector without a metric name: {{{matchers}}}")
            continue
        used.add(metric)
        for label in _MATCHER_LABEL.findall(_STRING.sub('""', matchers)):
            if metric in series and label not in series[metric]:
                problems.append(f"{metric} has no label {label!r}")
    rest = _SELECTOR.sub(lambda match: f" {match.group(1)} ", _RANGE.sub(" ", expr))

    grouping = {label.strip() for labels in _GROUPING.findall(rest) for label in labels.split(",") if label.strip()}
    rest = _NUMBER.sub(" ", _GROUPING.sub(" ", rest))
    used |= {word for word in _IDENTIFIER.findall(rest) if word not in PROMQL_WORDS}

    problems += [f"unknown metric {metric!r}" for metric in sorted(used - set(series))]
    carried = set().union(*(series[metric] for metric in used if metric in series))
    problems += [f"grouping label {label!r} is on none of {sorted(used)}" for label in sorted(grouping - carried)]
    return problems


def test_the_query_checker_catches_misspellings():
    series = known_series()
    assert query_problems('sum by (route) (rate(ray_aligner_requests_total{status=~"5.."}[5m]))', series) == []
    assert query_problems("rate(ray_aligner_request_total[5m])", series) == ["unknown metric 'ray_aligner_request_total'"]
    assert query_problems("rate(aligner_requests_total[5m])", series) == ["unknown metric 'aligner_requests_total'"]
    assert query_problems('rate(ray_aligner_requests_total{stauts="500"}[5m])', series) == [
        "ray_aligner_requests_total has no label 'stauts'"
    ]
    assert query_problems("sum by (stage) (rate(ray_aligner_requests_total[5m]))", series) == [
        "grouping label 'stage' is on none of ['ray_aligner_requests_total']"
    ]
    # A histogram is only queryable through its exported series.
    assert query_problems("rate(ray_aligner_stage_seconds[5m])", series) == ["unknown metric 'ray_aligner_stage_seconds'"]
    assert query_problems("label_values(ray_serve_deployment_replica_healthy, app)", series) == [
        "ray_serve_deployment_replica_healthy has no label 'app'"
    ]


def test_custom_metric_names_follow_rays_export_convention():
    series = custom_series()
    assert "ray_aligner_requests_total" in series  # Counter
    assert {"ray_aligner_stage_seconds_bucket", "ray_aligner_stage_seconds_sum", "ray_aligner_stage_seconds_count"} <= set(series)
    assert "ray_aligner_dependency_up" in series  # Gauge
    assert {"route", "status", "application", "replica"} <= series["ray_aligner_requests_total"]


def _ray_metric_sources() -> str:
    import ray

    package = Path(ray.__file__).parent
    files = [*(package / "serve").rglob("*.py"), *(package / "dashboard" / "modules" / "reporter").glob("*.py")]
    return "\n".join(path.read_text() for path in files if "tests" not in path.parts)


def test_the_builtin_families_are_still_defined_by_the_installed_ray():
    """A Ray upgrade that renames a family we rely on fails here, not silently on a dashboard."""
    sources = _ray_metric_sources()
    for family in RAY_BUILTIN_FAMILIES:
        defined = family.removeprefix("ray_").removesuffix("_total")
        # The HTTP families are defined once per protocol: f"serve_num_{protocol_name}_requests".
        templated = re.sub(r"(?<=_)http(?=_)", "{protocol_name}", defined)
        assert f'"{defined}"' in sources or f'"{templated}"' in sources, family


# ---------------------------------------------------------------------------------------------
# Prometheus


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def alert_rules() -> Iterator[dict]:
    for group in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]:
        yield from group["rules"]


def test_prometheus_discovers_ray_nodes_from_rays_file_and_loads_the_rules():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    discovery_files = [
        file for job in config["scrape_configs"] for sd in job.get("file_sd_configs", []) for file in sd["files"]
    ]
    assert f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}" in discovery_files
    assert config["rule_files"], "no rule files"
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_DIR / rule_file).is_file(), rule_file


def test_every_alert_is_complete_and_documented():
    runbook = OPERATIONS_DOC.read_text()
    names = []
    for rule in alert_rules():
        assert {"alert", "expr", "for", "labels", "annotations"} <= set(rule), rule.get("alert", rule)
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert rule["alert"] in runbook, f"{rule['alert']} has no entry in docs/operations.md"
        names.append(rule["alert"])
    assert len(names) == len(set(names)), "duplicate alert names"
    assert len(names) >= 10


def test_alert_queries_use_only_exported_metrics_and_labels():
    series = known_series()
    problems = {rule["alert"]: query_problems(rule["expr"], series) for rule in alert_rules()}
    assert {alert: found for alert, found in problems.items() if found} == {}


def _deployment(config: dict, name: str) -> dict:
    (app,) = config["applications"]
    return next(deployment for deployment in app["deployments"] if deployment["name"] == name)


def test_queue_alert_threshold_is_below_the_aligner_queue_limit():
    (rule,) = [rule for rule in alert_rules() if rule["alert"] == "AlignerQueueSaturated"]
    threshold = float(re.search(r"ray_serve_deployment_queued_queries\{[^}]*\}\)\s*>\s*([\d.]+)", rule["expr"]).group(1))
    limit = _deployment(load_yaml(ROOT / "configs" / "serve.gpu.yaml"), "Aligner")["max_queued_requests"]
    assert 0.5 * limit <= threshold < limit


# ---------------------------------------------------------------------------------------------
# Grafana


def dashboard_queries(dashboard: dict) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']}", variable["query"]["query"]


def test_dashboard_panels_all_have_queries():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert any(variable["type"] == "datasource" for variable in dashboard["templating"]["list"])
    graphs = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len(graphs) >= 20
    for panel in graphs:
        assert panel["targets"], panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]


def test_dashboard_covers_every_custom_metric():
    text = DASHBOARD.read_text()
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in custom_series()}
    assert sorted(family for family in families if family not in text) == []


def test_dashboard_queries_use_only_exported_metrics_and_labels():
    series = known_series()
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    problems = {where: found for where, query in queries if (found := query_problems(query, series))}
    assert problems == {}


# ---------------------------------------------------------------------------------------------
# KubeRay


def rayservice() -> dict:
    return load_yaml(KUBERAY_DIR / "rayservice.yaml")


def kubernetes_objects() -> list[dict]:
    return [doc for path in sorted(KUBERAY_DIR.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def ray_groups(service: dict) -> dict[str, dict]:
    cluster = service["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{group["groupName"]: group for group in cluster["workerGroupSpecs"]}}


def ray_containers(service: dict) -> dict[str, dict]:
    """The Ray container of each group (the first container, by KubeRay's convention)."""
    return {name: group["template"]["spec"]["containers"][0] for name, group in ray_groups(service).items()}


def test_rayservice_embeds_exactly_the_gpu_serve_config():
    service = rayservice()
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == load_yaml(ROOT / "configs" / "serve.gpu.yaml")
    assert lint_serve_config(embedded) == []


def test_rayservice_cluster_shape():
    service = rayservice()
    import ray

    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == ray.__version__
    groups = ray_groups(service)
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"
    limits = {name: container["resources"]["limits"] for name, container in ray_containers(service).items()}
    gpu_groups = [name for name, limit in limits.items() if int(limit.get("nvidia.com/gpu", 0)) >= 1]
    cpu_groups = [name for name, limit in limits.items() if name != "head" and "nvidia.com/gpu" not in limit]
    assert len(gpu_groups) == 1 and len(cpu_groups) >= 1
    (gpu,) = gpu_groups

    aligner = _deployment(yaml.safe_load(service["spec"]["serveConfigV2"]), "Aligner")
    assert float(groups[gpu]["rayStartParams"].get("num-cpus", limits[gpu]["cpu"])) >= aligner["ray_actor_options"]["num_cpus"]
    assert groups[gpu]["maxReplicas"] >= aligner["autoscaling_config"]["max_replicas"]


def test_every_ray_pod_exports_metrics_on_the_same_named_port():
    service = rayservice()
    ports = {group["rayStartParams"]["metrics-export-port"] for group in ray_groups(service).values()}
    assert len(ports) == 1
    (port,) = ports
    for name, container in ray_containers(service).items():
        named = {item["name"]: item["containerPort"] for item in container["ports"]}
        assert named.get("metrics") == int(port), name
    (monitor,) = [obj for obj in kubernetes_objects() if obj["kind"] == "PodMonitor"]
    assert {endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]} == {"metrics"}
    for name, group in ray_groups(service).items():
        assert monitor["spec"]["selector"]["matchLabels"].items() <= group["template"]["metadata"]["labels"].items(), name


class _RecordingEnvironment(dict):
    """An empty environment that remembers which names were looked up."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def get(self, name, default=None):
        self.names.add(name)
        return default


def environment_names_read_by_the_service() -> set[str]:
    from serve_app.settings import Environment

    recorder = _RecordingEnvironment()
    Environment.from_env(recorder)
    return recorder.names


def test_rayservice_environment_is_what_the_code_reads_with_secrets_from_kubernetes_secrets():
    from serve_app import proxy_middleware

    read = environment_names_read_by_the_service()
    for group, container in ray_containers(rayservice()).items():
        env = {item["name"]: item for item in container["env"]}
        unknown = {name for name in env if name.startswith("ALIGNER_")} - read
        assert unknown == set(), f"{group}: names the service never reads: {unknown}"
        for secret in ("ALIGNER_REDIS_URL", "ALIGNER_API_KEY_PEPPER"):
            assert "value" not in env[secret] and env[secret]["valueFrom"]["secretKeyRef"]["name"], (group, secret)
        hook = env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]["value"]
        module, function = hook.split(":")
        assert module == proxy_middleware.__name__ and callable(getattr(proxy_middleware, function)), (group, hook)


def test_no_secret_values_are_committed_and_every_secret_is_documented():
    objects = kubernetes_objects()
    assert [obj["metadata"]["name"] for obj in objects if obj["kind"] == "Secret"] == []
    manifests = "".join(path.read_text() for path in KUBERAY_DIR.glob("*.yaml"))
    referenced = set(re.findall(r"secretKeyRef:\s*\{name:\s*([\w-]+)", manifests))
    assert {"aligner-redis", "aligner-api-key-pepper"} <= referenced
    documented = set(re.findall(r"kubectl create secret generic ([\w-]+)", OPERATIONS_DOC.read_text()))
    assert referenced - documented == set()


def test_dependencies_are_reachable_at_the_configured_addresses_by_ray_pods_only():
    objects = kubernetes_objects()
    services = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "Service"}
    env = {item["name"]: item for item in ray_containers(rayservice())["head"]["env"]}
    host, port = re.fullmatch(r"tcp://([\w-]+):(\d+)", env["ALIGNER_CLAMD_ADDRESS"]["value"]).groups()
    assert int(port) in {item["port"] for item in services[host]["spec"]["ports"]}
    assert 6379 in {item["port"] for item in services["aligner-redis"]["spec"]["ports"]}

    ray_labels = rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    policies = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "NetworkPolicy"}
    for name in ("aligner-redis", "aligner-clamd"):
        selected = policies[name]["spec"]["podSelector"]["matchLabels"]
        assert selected.items() <= services[name]["spec"]["selector"].items(), name
        (rule,) = policies[name]["spec"]["ingress"]
        (source,) = rule["from"]
        assert source["podSelector"]["matchLabels"].items() <= ray_labels.items(), name


# ---------------------------------------------------------------------------------------------
# promtool: Prometheus' own parser and rule evaluator, where installed (Debian package `prometheus`).

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package: prometheus)")


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_accepts_the_config_and_the_rules():
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        result = promtool(*args, cwd=PROMETHEUS_DIR)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alerts_fire_on_exported_series_and_stay_quiet_otherwise():
    result = promtool("test", "rules", "alerts.test.yml", cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path):
    # Grafana's variables, replaced by values Prometheus accepts.
    def concrete(query: str) -> str:
        return query.replace("$__rate_interval", "5m").replace("$application", ".*")

    queries = [query for _, query in dashboard_queries(json.loads(DASHBOARD.read_text())) if "label_values" not in query]
    recording = [{"record": f"dashboard:query{index}", "expr": concrete(query)} for index, query in enumerate(queries)]
    rules = {"groups": [{"name": "dashboard", "rules": recording}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_worker_group_mounts_the_one_shared_spool_where_the_spool_dir_points():
    # Replicas hand each other spool paths (an upload, decoded audio) across pods: a spool local to
    # each pod would make a Scanner miss the Ingress's upload as soon as they sit on different nodes.
    service = rayservice()
    claims = {obj["metadata"]["name"]: obj for obj in kubernetes_objects() if obj["kind"] == "PersistentVolumeClaim"}
    containers = ray_containers(service)
    for name, group in ray_groups(service).items():
        if name == "head":
            continue  # runs no replica
        env = {item["name"]: item.get("value") for item in containers[name]["env"]}
        spool_dir = env["ALIGNER_SPOOL_DIR"]
        volumes = {volume["name"]: volume for volume in group["template"]["spec"]["volumes"]}
        (mount,) = [m for m in containers[name]["volumeMounts"] if spool_dir.startswith(m["mountPath"].rstrip("/") + "/")]
        assert not mount.get("readOnly", False), name
        claim = claims[volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], name
        assert spool_dir != mount["mountPath"], "the spool must be a directory inside the volume (the spool makes it 0700)"


def test_cluster_yaml_mounts_one_shared_spool_on_every_worker():
    config = load_yaml(ROOT / "cluster.yaml")
    mounts = [command for command in config["worker_setup_commands"] if "mount -t nfs4" in command]
    assert len(mounts) == 1 and "/mnt/aligner-shared" in mounts[0]
    # The env file (not in the repository) sets the spool inside that mount, as the docs say.
    assert "`/mnt/aligner-shared/spool`" in (ROOT / "docs" / "operations.md").read_text()
