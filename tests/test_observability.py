"""What the running graph tells its operators: Prometheus metrics, the audit log, Serve's request logs.

One module fixture drives a fixed set of exchanges through the PocketSphinx application ("/"), each
with an X-Request-Id of its own: an alignment, a 401, a 415, an upload that is not audio, malware, a
403 scope denial, a spent quota (429), an auth-failure loop until its address is banned, an admin
action, a path with an id in it and an unknown path. The tests then read what those left behind:

- Ray's Prometheus endpoint, parsed with prometheus_client's text parser: every custom family under
  the name Ray 2.60 exports (`ray_aligner_*`, `_total` on counters, `_bucket/_sum/_count` on
  histograms) grew by at least what the exchanges caused, with plausible values, and no label value
  carries a key id, an IP address or a path with an id;
- the audit log file (ALIGNER_AUDIT_LOG): one JSON object per line, one line per decision, carrying
  the request id the client sent, the client IP and the principal, never a credential;
- Serve's replica logs: the same request id on the Ingress, Scanner and Aligner hops.

A replica's custom metrics reach the export a few seconds after they are emitted, so the metric checks
poll (up to 40 s). Counters are compared with a scrape taken before the exchanges.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from serve_app.security.api_keys import parse_api_key
from serve_app.settings import AbuseOptions
from tests.conftest import DRIVER_APPLICATION, EVAL_DIR, create_api_key
from tests.support.cluster import logs_dir, metrics_url
from tests.support.secrets_seen import remember, seen
from tools.local_services import EICAR_SIGNATURE, eicar

APPLICATION = "aligner"  # the PocketSphinx application, routed at "/"
EXPORT_WAIT_S = 40.0
# Documentation addresses (RFC 5737) no other test uses; the test config trusts X-Forwarded-For
# from loopback, so each stands for a distinct client.
AUTH_ATTACKER_IP = "203.0.113.41"
MALWARE_SENDER_IP = "203.0.113.42"
MALFORMED_KEY = "fa_not-a-real-key"  # fails the key format check: reason "bad-format"
NOT_AUDIO = b"Minutes of the meeting, not a recording. " * 64
AUDIT_FIELDS = ("ts", "event", "decision", "reason", "request_id", "client_ip", "principal", "route")


@dataclass(frozen=True)
class Exchange:
    request_id: str
    response: httpx.Response


@dataclass
class Traffic:
    """What the module fixture sent, and the metric samples exported before it started."""

    baseline: list[Sample]
    started_at: float
    exchanges: dict[str, Exchange] = field(default_factory=dict)
    key_ids: dict[str, str] = field(default_factory=dict)  # role -> key id
    auth_failures_until_ban: int = 0
    aligned_seconds: float = 0.0

    def request_id(self, name: str) -> str:
        return self.exchanges[name].request_id


# -- helpers ---------------------------------------------------------------------------------------


def scrape() -> list[Sample]:
    text = httpx.get(metrics_url(), timeout=10).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum over this application's replicas of the series `name` whose labels include `labels`."""
    wanted = {"application": APPLICATION, **labels}
    return sum(
        sample.value for sample in samples if sample.name == name and wanted.items() <= sample.labels.items()
    )


def send(
    http: httpx.Client, name: str, traffic: Traffic, method: str, path: str, *,
    key: str | None = None, client_ip: str | None = None, **request: object,
) -> httpx.Response:  # fmt: skip
    request_id = f"obs-{name}-{uuid.uuid4().hex[:12]}"
    headers = {"x-request-id": request_id}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if client_ip is not None:
        headers["X-Forwarded-For"] = client_ip
    response = http.request(method, path, headers=headers, **request)
    assert response.headers["x-request-id"] == request_id  # Serve's proxy kept the client's id
    traffic.exchanges[name] = Exchange(request_id, response)
    return response


def multipart(audio: bytes, text: str) -> dict:
    return {"files": {"audio": ("clip.wav", audio, "audio/wav")}, "data": {"text": text}}


def new_key(redis_server, role: str, traffic: Traffic, plan: str = "unlimited") -> str:
    key = remember(create_api_key(redis_server, f"observability-{role}", ["align"], plan))
    traffic.key_ids[role] = parse_api_key(key).key_id
    return key


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(condition: Callable[[], list[str]], timeout_s: float) -> list[str]:
    """Poll `condition` (which lists what is still missing) until it lists nothing or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = condition()
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(1.0)


# -- the exchanges -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traffic(anonymous, redis_server, admin_key, eval_utterances) -> Traffic:
    traffic = Traffic(baseline=scrape(), started_at=time.time())
    observer = new_key(redis_server, "observer", traffic)
    utterance = eval_utterances[0]
    clip = (EVAL_DIR / utterance["audio"]).read_bytes()

    response = send(anonymous, "aligned", traffic, "POST", "/v1/align", key=observer, **multipart(clip, utterance["transcript"]))
    assert response.status_code == 200, response.text
    traffic.aligned_seconds = response.json()["duration"]

    response = send(anonymous, "unauthenticated", traffic, "POST", "/v1/align", **multipart(clip, "hello"))
    assert response.status_code == 401, response.text

    response = send(anonymous, "not-multipart", traffic, "POST", "/v1/align", key=observer, json={"text": "hello"})
    assert response.status_code == 415, response.text

    response = send(anonymous, "not-audio", traffic, "POST", "/v1/align", key=observer, **multipart(NOT_AUDIO, "hello"))
    assert response.status_code == 415, response.text

    malware_key = new_key(redis_server, "malware", traffic)
    for _ in range(AbuseOptions().max_malware_hits):  # the last hit bans the key and the address
        response = send(
            anonymous, "malware", traffic, "POST", "/v1/align", key=malware_key, client_ip=MALWARE_SENDER_IP, **multipart(eicar(), "hello")
        )
        assert response.status_code == 422, response.text

    response = send(
        anonymous, "scope-denied", traffic, "POST", "/v1/admin/keys", key=observer, json={"owner": "nobody", "scopes": ["align"]}
    )
    assert response.status_code == 403, response.text

    five_requests = new_key(redis_server, "five-requests", traffic, plan="five-requests")
    for _ in range(5):  # each takes a request token, then fails its body check
        response = send(anonymous, "quota-spent", traffic, "POST", "/v1/align", key=five_requests, json={})
        assert response.status_code == 415, response.text
    response = send(anonymous, "quota-exceeded", traffic, "POST", "/v1/align", key=five_requests, json={})
    assert response.status_code == 429, response.text

    # Fail authentication from one address until it is banned: the request that crossed the
    # threshold still gets its 401 (it imposed the ban), the next one meets the ban (429).
    for _ in range(AbuseOptions().max_auth_failures + 1):
        response = send(anonymous, "ban-enforced", traffic, "GET", "/v1/admin/keys", key=MALFORMED_KEY, client_ip=AUTH_ATTACKER_IP)
        if response.status_code != 401:
            break
        traffic.exchanges["ban-imposed"] = traffic.exchanges["ban-enforced"]
        traffic.auth_failures_until_ban += 1
    assert response.status_code == 429, response.text

    response = send(
        anonymous, "admin-created-key", traffic, "POST", "/v1/admin/keys", key=admin_key,
        json={"owner": "observability-created", "scopes": ["align"], "plan": "standard"},
    )  # fmt: skip
    assert response.status_code == 201, response.text
    created = response.json()
    remember(created["key"])
    traffic.key_ids["admin-created"] = created["record"]["key_id"]
    traffic.key_ids["admin"] = parse_api_key(admin_key).key_id

    response = send(anonymous, "admin-show-key", traffic, "GET", f"/v1/admin/keys/{created['record']['key_id']}", key=admin_key)
    assert response.status_code == 200, response.text

    # A subject with a slash (an IPv6 /64): the route's template, not the `:path` convertor, is its label.
    response = send(anonymous, "admin-lift-no-ban", traffic, "DELETE", "/v1/admin/bans/ip:2001:db8:ffff:ffff::/64", key=admin_key)
    assert response.status_code == 404, response.text

    response = send(anonymous, "unmatched", traffic, "GET", f"/v1/no-such-route/{uuid.uuid4().hex}", key=observer)
    assert response.status_code == 404, response.text
    return traffic


# -- Prometheus ----------------------------------------------------------------------------------------


def expected_growth(traffic: Traffic) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(series, labels) -> the least it must have grown by, from the exchanges of the fixture."""
    series: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def grew(name: str, by: float = 1, **labels: str) -> None:
        series[(name, tuple(sorted(labels.items())))] = by

    for route, status in [
        ("/v1/align", "200"), ("/v1/align", "401"), ("/v1/align", "415"), ("/v1/align", "422"), ("/v1/align", "429"),
        ("/v1/admin/keys", "201"), ("/v1/admin/keys", "403"), ("/v1/admin/keys", "401"), ("/v1/admin/keys", "429"),
        ("/v1/admin/keys/{key_id}", "200"), ("/v1/admin/bans/{subject}", "404"), ("unmatched", "404"),
    ]:  # fmt: skip
        grew("ray_aligner_requests_total", route=route, status=status)
    for stage in ("auth", "limit", "upload", "scan", "align", "total"):
        grew("ray_aligner_stage_seconds_count", stage=stage)
    grew("ray_aligner_auth_failures_total", method="none", reason="missing")
    grew("ray_aligner_auth_failures_total", traffic.auth_failures_until_ban, method="api_key", reason="bad-format")
    grew("ray_aligner_auth_failures_total", method="api_key", reason="insufficient-scope")
    for policy in ("pre-auth", "requests", "audio-seconds"):
        grew("ray_aligner_ratelimit_decisions_total", policy=policy, result="allowed")
    grew("ray_aligner_ratelimit_decisions_total", policy="requests", result="denied")
    grew("ray_aligner_bans_total", 2, subject="ip", action="imposed")  # the auth-failure loop, the malware sender
    grew("ray_aligner_bans_total", subject="ip", action="enforced")
    grew("ray_aligner_bans_total", subject="principal", action="imposed")
    for verdict in ("clean", "malware", "rejected"):
        grew("ray_aligner_scanner_verdicts_total", verdict=verdict)
    grew("ray_aligner_decode_rejections_total", reason="unsupported-media-type")
    grew("ray_aligner_audio_seconds_total", traffic.aligned_seconds - 0.01, backend="pocketsphinx")
    for histogram in ("ray_aligner_batch_size_count", "ray_aligner_inference_seconds_count"):
        grew(histogram, backend="pocketsphinx")
    return series


def missing_metrics(traffic: Traffic, samples: list[Sample]) -> list[str]:
    missing = [
        f"{name}{dict(labels)} grew by {total(samples, name, **dict(labels)) - total(traffic.baseline, name, **dict(labels)):g} < {least:g}"
        for (name, labels), least in expected_growth(traffic).items()
        if total(samples, name, **dict(labels)) - total(traffic.baseline, name, **dict(labels)) < least
    ]
    for dependency in ("redis", "clamd"):
        values = [
            sample.value
            for sample in samples
            if sample.name == "ray_aligner_dependency_up" and sample.labels.get("dependency") == dependency
            and sample.labels.get("application") == APPLICATION
        ]  # fmt: skip
        if not values or any(value != 1 for value in values):
            missing.append(f"ray_aligner_dependency_up{{dependency={dependency!r}}} = {values}, want all 1")
    return missing


@pytest.fixture(scope="module")
def exported(traffic) -> list[Sample]:
    """A scrape that holds every effect of the exchanges (or the test fails listing what is missing)."""
    latest: list[Sample] = []

    def still_missing() -> list[str]:
        latest[:] = scrape()
        return missing_metrics(traffic, latest)

    missing = wait_for(still_missing, EXPORT_WAIT_S)
    assert missing == [], f"not exported within {EXPORT_WAIT_S:.0f} s: {missing}"
    return latest


def test_every_custom_family_is_exported_with_its_labels(exported):
    # `exported` already waited for each expected series to grow; here, the families' shapes.
    names = {sample.name for sample in exported if sample.name.startswith("ray_aligner_")}
    for histogram in ("stage_seconds", "batch_size", "inference_seconds"):
        assert {f"ray_aligner_{histogram}_{part}" for part in ("bucket", "sum", "count")} <= names
    for counter in ("requests", "auth_failures", "ratelimit_decisions", "bans", "scanner_verdicts", "decode_rejections", "audio_seconds"):
        assert f"ray_aligner_{counter}_total" in names
    request = next(sample for sample in exported if sample.name == "ray_aligner_requests_total")
    assert {"route", "status", "application", "deployment", "replica"} <= request.labels.keys()
    # Each series names the replica that recorded it, as Serve's own ray_serve_* series do.
    recorded_by = {
        "ray_aligner_requests_total": "Ingress", "ray_aligner_scanner_verdicts_total": "Scanner",
        "ray_aligner_batch_size_count": "Aligner",
    }  # fmt: skip
    for sample in exported:
        if sample.name.startswith("ray_aligner_") and sample.labels["application"] != DRIVER_APPLICATION:
            assert sample.labels["application"] in ("aligner", "qwen3") and sample.labels["replica"], sample
            assert sample.labels["deployment"] == recorded_by.get(sample.name, sample.labels["deployment"]), sample


def test_histograms_hold_plausible_values(exported):
    for stage in ("auth", "limit", "upload", "scan", "align", "total"):
        count = total(exported, "ray_aligner_stage_seconds_count", stage=stage)
        mean_s = total(exported, "ray_aligner_stage_seconds_sum", stage=stage) / count  # from bucket midpoints, see below
        assert 0 < mean_s < 60, (stage, mean_s)
        assert total(exported, "ray_aligner_stage_seconds_bucket", stage=stage, le="+Inf") == count
    # Ray 2.60 exports a histogram's _sum from bucket midpoints (a batch of 1 adds 0.5): buckets only.
    batches = total(exported, "ray_aligner_batch_size_count", backend="pocketsphinx")
    assert total(exported, "ray_aligner_batch_size_bucket", backend="pocketsphinx", le="8.0") == batches  # max_batch_size
    assert 0 < total(exported, "ray_aligner_inference_seconds_sum", backend="pocketsphinx") < 3600
    # Every align stage runs inside a request whose total is observed too.
    stage_sum_s = {stage: total(exported, "ray_aligner_stage_seconds_sum", stage=stage) for stage in ("align", "total")}
    assert stage_sum_s["total"] >= stage_sum_s["align"]


def route_templates() -> set[str]:
    from deployments.ingress import app

    return set(app.openapi()["paths"]) | {app.openapi_url, app.docs_url}


def test_label_values_are_low_cardinality(exported, traffic):
    from ray.util.metrics import Metric

    from serve_app import metrics

    own_labels = {
        f"ray_{metric.info['name']}": set(metric.info["tag_keys"]) for metric in vars(metrics).values() if isinstance(metric, Metric)
    }
    routes = route_templates() | {"unmatched"}
    values: dict[str, set[str]] = {}
    for sample in exported:
        family = re.sub(r"_(total|bucket|sum|count)$", "", sample.name)
        for label in own_labels.get(family, ()):
            value = sample.labels[label]
            values.setdefault(label, set()).add(value)
            assert not any(key_id in value for key_id in traffic.key_ids.values()), (sample.name, label, value)
            assert "fa_" not in value and not looks_like_ip(value), (sample.name, label, value)
            if label == "route":
                assert value in routes, (sample.name, value)  # a template, never the path with its ids
    assert {"/v1/admin/keys/{key_id}", "/v1/admin/bans/{subject}", "unmatched"} <= values["route"]
    assert all(len(seen) <= 40 for seen in values.values()), {label: len(seen) for label, seen in values.items()}


def looks_like_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return bool(re.search(r"\d{1,3}(\.\d{1,3}){3}", value))
    return True


# -- the audit log -------------------------------------------------------------------------------------


def lines_of(lines: list[dict], request_id: str) -> list[dict]:
    return [line for line in lines if line["request_id"] == request_id]


def decisions(lines: list[dict], request_id: str) -> set[tuple[str, str, str]]:
    return {(line["event"], line["decision"], line["reason"]) for line in lines_of(lines, request_id)}


@pytest.fixture(scope="module")
def audited(traffic, audit_log_path) -> list[dict]:
    def still_missing() -> list[str]:  # replicas append while this reads: wait for the last exchange
        ids = {line.get("request_id") for line in audit_lines(audit_log_path)}
        return [] if traffic.request_id("admin-created-key") in ids else ["admin-created-key"]

    assert wait_for(still_missing, 10) == []
    return audit_lines(audit_log_path)


def test_audit_log_is_one_json_object_per_line_with_every_field(audited, traffic, admin_key):
    assert audited and all(isinstance(line, dict) for line in audited)
    ours = [line for line in audited if line["request_id"].startswith("obs-")]
    assert len(ours) >= len(traffic.exchanges)
    credentials = seen() | {admin_key, MALFORMED_KEY}
    for line in ours:
        assert set(AUDIT_FIELDS) <= line.keys(), line
        assert traffic.started_at - 1 <= line["ts"] <= time.time()
        assert line["route"] in route_templates(), line
        assert not any(credential in json.dumps(line) for credential in credentials), line["request_id"]


def test_audit_log_records_each_decision_with_the_clients_request_id(audited, traffic):
    observer = traffic.key_ids["observer"]
    expected = {
        "aligned": ({("auth", "allowed", "authenticated"), ("scan", "allowed", "clean")}, "127.0.0.1", observer),
        "unauthenticated": ({("auth", "denied", "missing")}, "127.0.0.1", None),
        "scope-denied": ({("auth", "denied", "insufficient-scope")}, "127.0.0.1", observer),
        "not-audio": ({("scan", "denied", "unsupported-media-type")}, "127.0.0.1", observer),
        "malware": (
            {("scan", "denied", "malware-detected"), ("ban", "imposed", "malware")}, MALWARE_SENDER_IP, traffic.key_ids["malware"]
        ),
        "quota-exceeded": ({("limit", "denied", "requests")}, "127.0.0.1", traffic.key_ids["five-requests"]),
        "ban-imposed": ({("auth", "denied", "bad-format"), ("ban", "imposed", "auth_failure")}, AUTH_ATTACKER_IP, None),
        "ban-enforced": ({("ban", "denied", "auth_failure")}, AUTH_ATTACKER_IP, None),
        "admin-created-key": ({("admin", "allowed", "key-created")}, "127.0.0.1", traffic.key_ids["admin"]),
    }
    for name, (wanted, client_ip, principal) in expected.items():
        request_id = traffic.request_id(name)
        assert wanted <= decisions(audited, request_id), (name, decisions(audited, request_id))
        for line in lines_of(audited, request_id):
            assert (line["client_ip"], line["principal"]) == (client_ip, principal), (name, line)

    aligned = next(line for line in lines_of(audited, traffic.request_id("aligned")) if line["event"] == "scan")
    assert aligned["decoded_seconds"] == pytest.approx(traffic.aligned_seconds, abs=0.01)
    created = next(line for line in lines_of(audited, traffic.request_id("admin-created-key")) if line["event"] == "admin")
    assert created["key_id"] == traffic.key_ids["admin-created"]


def test_malware_signature_is_audited_and_never_told_to_the_client(audited, traffic):
    scan = next(line for line in lines_of(audited, traffic.request_id("malware")) if line["event"] == "scan")
    assert scan["signature"].startswith(EICAR_SIGNATURE)  # clamd may append ".UNOFFICIAL"
    response = traffic.exchanges["malware"].response
    assert EICAR_SIGNATURE not in response.text and "Eicar" not in response.text


# -- Serve's own request logs ----------------------------------------------------------------------


def replica_log_lines(deployment: str, request_id: str) -> list[str]:
    files = (logs_dir() / "serve").glob(f"replica_{APPLICATION}_{deployment}_*.log")
    return [line for path in files for line in path.read_text(errors="replace").splitlines() if request_id in line]


def test_request_id_reaches_every_hop_in_serves_replica_logs(traffic):
    request_id = traffic.request_id("aligned")
    calls = {"Ingress": "POST /v1/align 200", "Scanner": "inspect OK", "Aligner": "align OK"}

    def hops_without_the_id() -> list[str]:
        return [
            deployment
            for deployment, call in calls.items()
            if not any(call in line for line in replica_log_lines(deployment, request_id))
        ]

    assert wait_for(hops_without_the_id, 10) == []
