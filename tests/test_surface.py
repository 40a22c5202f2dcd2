"""The HTTP surface in-process: the ingress's FastAPI app with a real Gate on a private real Redis.

Only the routes that need no Scanner or Aligner (admin, OpenAPI, errors) run here, without Ray;
tests/test_surface_http.py sends the same attacks through the real Serve graph. The request body
is a generator, so a test sees how much of it the app pulled before answering.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import pytest_asyncio

from ray.serve.exceptions import BackPressureError

from deployments.ingress import Ingress, app
from serve_app.api.gate import Gate
from serve_app.security.audit import AuditLog
from serve_app.settings import Environment, IngressOptions
from tests.conftest import PEPPER
from tests.support import keys
from tests.test_api import assert_problem

MIB = 1024 * 1024


class CountedBody:
    """A request body of `chunks` MiB, counting what the server pulled."""

    def __init__(self, chunks: int):
        self.chunks, self.sent = chunks, 0

    async def __aiter__(self):
        for _ in range(self.chunks):
            self.sent += 1
            yield b"{" * MIB


@pytest.fixture
def admin_credential(private_redis_server) -> str:
    return keys.create_api_key(private_redis_server.url, PEPPER, "surface-admin", ["align", "admin"], "standard")


@pytest_asyncio.fixture
async def ingress(private_redis_server, tmp_path):
    environment = Environment.from_env(
        {"ALIGNER_REDIS_URL": private_redis_server.url, "ALIGNER_API_KEY_PEPPER": PEPPER.decode(), "ALIGNER_AUDIT_LOG": str(tmp_path / "audit")}
    )
    options = IngressOptions(rate_limits={"pre_auth_burst": 3, "pre_auth_per_minute": 0.01})
    gate = app.state.gate = Gate(environment, options, AuditLog.from_destination(environment.audit_log))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress.test") as client:
        yield client
    await gate.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/v1/admin/keys", "/v1/admin/keys/k_1/rotate"])
async def test_unauthenticated_admin_body_is_refused_before_it_is_read(ingress, path):
    body = CountedBody(64)
    response = await ingress.post(path, content=body, headers={"Content-Type": "application/json"})
    assert_problem(response, 401, "unauthenticated")
    assert body.sent <= 1  # FastAPI body parameters used to read all 64 MiB, then answer 400


@pytest.mark.asyncio
async def test_admin_body_over_the_cap_is_413_by_length_and_while_streaming(ingress, admin_credential):
    auth = {"Authorization": f"Bearer {admin_credential}", "Content-Type": "application/json"}
    declared = await ingress.post("/v1/admin/keys", content=b" " * (64 * 1024 + 1), headers=auth)
    assert_problem(declared, 413, "payload-too-large")
    streamed = CountedBody(8)
    response = await ingress.post("/v1/admin/keys", content=streamed, headers=auth)
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "payload-too-large")
    assert streamed.sent == 1  # cut off at the first chunk past the cap


@pytest.mark.asyncio
async def test_admin_body_is_validated_after_authentication(ingress, admin_credential):
    auth = {"Authorization": f"Bearer {admin_credential}"}
    body = assert_problem(await ingress.post("/v1/admin/keys", json={"scopes": ["align"], "extra": 1}, headers=auth), 400, "invalid-request")
    assert "owner" in body["detail"] and "extra" in body["detail"]
    assert_problem(await ingress.post("/v1/admin/keys", content=b"{", headers={**auth, "Content-Type": "application/json"}), 400, "invalid-request")
    assert_problem(await ingress.post("/v1/admin/keys", data={"owner": "x"}, headers=auth), 400, "invalid-request")  # not JSON


@pytest.mark.asyncio
async def test_responses_that_reveal_a_key_are_not_stored(ingress, admin_credential):
    auth = {"Authorization": f"Bearer {admin_credential}"}
    created = await ingress.post("/v1/admin/keys", json={"owner": "surface", "scopes": ["align"]}, headers=auth)
    assert created.status_code == 201, created.text
    assert created.headers["cache-control"] == "no-store"
    key_id = created.json()["record"]["key_id"]
    rotated = await ingress.post(f"/v1/admin/keys/{key_id}/rotate", json={"overlap_hours": 1}, headers=auth)
    assert rotated.status_code == 201, rotated.text
    assert rotated.headers["cache-control"] == "no-store"
    assert rotated.json()["key"] != created.json()["key"]
    listed = await ingress.get("/v1/admin/keys", headers=auth)
    assert listed.status_code == 200 and "cache-control" not in listed.headers  # only answers with a secret


@pytest.mark.asyncio
async def test_pre_auth_429_carries_retry_after_and_the_ratelimit_headers(ingress):
    answers = [await ingress.get("/v1/admin/keys") for _ in range(4)]  # burst 3 per client IP
    assert [answer.status_code for answer in answers] == [401, 401, 401, 429]
    refused = answers[-1]
    body = refused.json()
    assert body["violated-policies"] == ["pre-auth"]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["ratelimit-policy"].startswith('"pre-auth";q=3;')
    assert refused.headers["ratelimit"].startswith('"pre-auth";r=0;t=')


@pytest.mark.asyncio
async def test_405_names_every_method_of_the_path(ingress):
    response = await ingress.put("/v1/admin/keys")
    assert_problem(response, 405, "method-not-allowed")
    assert response.headers["allow"] == "GET, POST"
    assert (await ingress.get("/v1/align")).headers["allow"] == "POST"
    assert (await ingress.post("/v1/admin/keys/k_1")).headers["allow"] == "GET"


@pytest.mark.asyncio
async def test_trailing_slash_is_a_404_not_a_redirect_to_the_clients_host(ingress):
    response = await ingress.get("/v1/admin/keys/", headers={"Host": "evil.example"})
    assert_problem(response, 404, "not-found")
    assert "location" not in response.headers


def test_openapi_declares_the_credentials_and_documents_admin_bodies():
    spec = app.openapi()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["apiKey"] == {**schemes["apiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["bearer"]["scheme"] == "bearer"
    for path in ("/v1/health", "/v1/ready"):
        assert spec["paths"][path]["get"]["security"] == []
    for path, method in [("/v1/align", "post"), ("/v1/admin/keys", "get"), ("/v1/admin/dependencies", "get")]:
        assert spec["paths"][path][method]["security"] == [{"apiKey": []}, {"bearer": []}]
    create = spec["paths"]["/v1/admin/keys"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"]["required"] == ["owner", "scopes"]
    assert "413" in create["responses"]
    rotate = spec["paths"]["/v1/admin/keys/{key_id}/rotate"]["post"]
    assert "overlap_hours" in rotate["requestBody"]["content"]["application/json"]["schema"]["properties"]


def test_openapi_describes_every_job_route():
    spec = app.openapi()
    routes = [("/v1/jobs", "post"), ("/v1/jobs", "get"), ("/v1/jobs/{job_id}", "get"), ("/v1/jobs/{job_id}", "delete"),
              ("/v1/jobs/{job_id}/result", "get"), ("/v1/admin/jobs", "get")]  # fmt: skip
    for path, method in routes:
        operation = spec["paths"][path][method]
        assert operation["security"] == [{"apiKey": []}, {"bearer": []}], (path, method)
        assert operation["summary"] and ("404" in operation["responses"]) == (path != "/v1/jobs" or method == "get"), (path, method)
    submit = spec["paths"]["/v1/jobs"]["post"]
    assert "Location" in submit["responses"]["202"]["headers"] and "429" in submit["responses"]
    assert [parameter["name"] for parameter in submit["parameters"]] == ["Idempotency-Key"]
    assert submit["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == ["audio", "text"]
    job = spec["components"]["schemas"]["JobOut"]["properties"]
    assert {"status", "progress", "error", "links", "expires_at"} <= set(job)
    assert "409" in spec["paths"]["/v1/jobs/{job_id}/result"]["get"]["responses"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("error", "named"),
    [(BackPressureError(num_queued_requests=64, max_queued_requests=64), "BackPressureError"), (RuntimeError("remote traceback ..."), "RuntimeError")],
)
async def test_a_dependency_probe_turns_any_exception_into_unavailable(error, named):
    async def failing_call():
        raise error

    assert await Ingress.func_or_class._probe(failing_call()) == (None, named)  # never a 500, never the message


@pytest.mark.asyncio
async def test_a_dependency_probe_that_hangs_is_unavailable_after_its_timeout():
    assert await Ingress.func_or_class._probe(asyncio.sleep(60)) == (None, "Timeout")
