"""The proxy middlewares, wrapped around an ASGI app exactly as Serve's proxy wraps them.

`_apply_middlewares` is Serve's own function (it adds Serve's request-id middleware first), and the
error answers come from Serve's own `send_http_response_on_exception`, so what is rewritten here is
byte for byte what Serve's proxy sends. tests/test_surface_http.py covers the same through Serve.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from ray.serve._private.http_util import _apply_middlewares, get_http_response_status, send_http_response_on_exception
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from serve_app.proxy_middleware import proxy_middlewares
from tests.test_api import assert_problem

CAP = 64 * 1024


class Deployment:
    """Stands where Serve's proxy hands the request on: records what it saw, answers `answer`."""

    def __init__(self, answer=None):
        self.answer = answer
        self.calls = 0
        self.body = b""
        self.request_id = None

    async def __call__(self, scope, receive, send):
        self.calls += 1
        self.request_id = dict(scope["headers"]).get(b"x-request-id", b"").decode()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            self.body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        messages = self.answer(self.request_id) if self.answer else [
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]},
            {"type": "http.response.body", "body": b"ok"},
        ]
        for message in messages:
            await send(message)


def serve_error(error: BaseException):
    return lambda request_id: send_http_response_on_exception(get_http_response_status(error, 300, request_id), False)


def client(deployment: Deployment) -> httpx.AsyncClient:
    proxy = _apply_middlewares(deployment, proxy_middlewares())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy), base_url="http://proxy.test")


def chunks(count: int, size: int = 16 * 1024):
    async def body():
        for _ in range(count):
            yield b"x" * size

    return body()


@pytest.mark.asyncio
@pytest.mark.parametrize("unsafe", ["a b", "x" * 129, "<script>", "id\u00e9"])
async def test_unsafe_request_id_is_replaced_before_serve_reads_it(unsafe):
    deployment = Deployment()
    async with client(deployment) as proxy:
        response = await proxy.get("/v1/health", headers={"X-Request-Id": unsafe.encode("utf-8")})
    assert deployment.request_id and deployment.request_id != unsafe
    assert response.headers["x-request-id"] == deployment.request_id  # one id: header, deployment, logs


@pytest.mark.asyncio
async def test_safe_request_id_is_kept():
    deployment = Deployment()
    async with client(deployment) as proxy:
        response = await proxy.get("/v1/health", headers={"X-Request-Id": "trace-42.a:b"})
    assert deployment.request_id == "trace-42.a:b" == response.headers["x-request-id"]


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/v1/health", "/v1/admin/keys", "/nope", "/qwen3/v1/ready"])
async def test_declared_body_over_the_cap_never_reaches_a_deployment(path):
    deployment = Deployment()
    async with client(deployment) as proxy:
        response = await proxy.post(path, content=b"x" * (CAP + 1))
    body = assert_problem(response, 413, "payload-too-large")
    assert deployment.calls == 0
    assert body["instance"] == f"urn:request:{response.headers['x-request-id']}"


@pytest.mark.asyncio
async def test_chunked_body_is_cut_off_at_the_cap():
    deployment = Deployment()
    async with client(deployment) as proxy:
        response = await proxy.post("/v1/admin/keys", content=chunks(64))  # 1 MiB, no Content-Length
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "payload-too-large")
    assert len(deployment.body) <= CAP


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/v1/align", "/qwen3/v1/align"])
async def test_uploads_are_left_to_the_ingress_cap(path):
    deployment = Deployment()
    async with client(deployment) as proxy:
        response = await proxy.post(path, content=chunks(16), headers={"X-API-Key": "fa_anything"})
    assert response.status_code == 200
    assert len(deployment.body) == 16 * 16 * 1024


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/v1/align", "/qwen3/v1/align"])
async def test_an_upload_without_any_credential_reaches_the_ingress_without_its_body(path):
    deployment = Deployment()  # stands for the ingress, which answers it 401 (and counts, audits it)
    async with client(deployment) as proxy:
        response = await proxy.post(path, content=chunks(16))
    assert response.status_code == 200 and deployment.calls == 1
    assert deployment.body == b""


@pytest.mark.asyncio
@pytest.mark.parametrize("credential", [{"Authorization": "Bearer x"}, {"x-api-key": "x"}])
async def test_an_upload_with_a_credential_header_keeps_its_body(credential):
    deployment = Deployment()
    async with client(deployment) as proxy:
        await proxy.post("/v1/align", content=b"audio", headers=credential)
    assert deployment.body == b"audio"


@pytest.mark.asyncio
async def test_serves_own_408_becomes_a_problem_document():
    deployment = Deployment(serve_error(asyncio.TimeoutError()))
    async with client(deployment) as proxy:
        response = await proxy.get("/v1/ready")
    body = assert_problem(response, 408, "request-timeout")
    assert body["instance"] == f"urn:request:{response.headers['x-request-id']}"
    assert "timed out" not in response.text  # Serve's own text (with its request id) is gone


@pytest.mark.asyncio
async def test_serves_own_503_keeps_its_retry_after():
    deployment = Deployment(serve_error(BackPressureError(num_queued_requests=64, max_queued_requests=64)))
    async with client(deployment) as proxy:
        response = await proxy.get("/v1/ready")
    assert_problem(response, 503, "service-unavailable")
    assert int(response.headers["retry-after"]) >= 1


@pytest.mark.asyncio
@pytest.mark.parametrize("loss", ["error answered by the proxy", "exception out of the proxy"])
async def test_a_request_whose_replica_was_lost_is_a_503_to_retry(loss):
    # Serve's proxy sends nothing for a replica that died mid-request (send_http_response_on_exception
    # answers only 408, 429 and 503); uvicorn would then write a bare 500.
    died = ActorDiedError()
    if loss == "error answered by the proxy":
        deployment = Deployment(serve_error(died))
    else:
        deployment = Deployment(lambda request_id: (_ for _ in ()).throw(died))
    async with client(deployment) as proxy:
        response = await proxy.post("/v1/align", headers={"Authorization": "Bearer k"}, content=b"x")
    body = assert_problem(response, 503, "service-unavailable")
    assert response.headers["retry-after"] == "5" and "lost" in body["detail"]


@pytest.mark.asyncio
async def test_the_ingress_problems_and_successes_pass_untouched():
    problem = json.dumps({"type": "urn:forced-aligner:problem:not-found", "title": "t", "status": 404, "detail": "no such key"}).encode()
    answer = [
        {"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/problem+json")]},
        {"type": "http.response.body", "body": problem},
    ]
    async with client(Deployment(lambda request_id: answer)) as proxy:
        response = await proxy.get("/v1/admin/keys/k_1")
    assert response.status_code == 404 and response.content == problem
    async with client(Deployment()) as proxy:
        response = await proxy.get("/v1/health")
    assert response.status_code == 200 and response.text == "ok"


def readiness(request_id):
    return [
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]},
        {"type": "http.response.body", "body": b'{"status":"ready"}'},
    ]


@pytest.mark.asyncio
async def test_a_flood_of_readiness_probes_costs_the_ingress_one_call():
    deployment = Deployment(readiness)
    async with client(deployment) as proxy:
        answers = await asyncio.gather(*(proxy.get("/qwen3/v1/ready") for _ in range(50)))
    assert [answer.status_code for answer in answers] == [200] * 50
    assert {answer.json()["status"] for answer in answers} == {"ready"}
    assert deployment.calls == 1
    assert len({answer.headers["x-request-id"] for answer in answers}) == 50  # each answer keeps its own id


@pytest.mark.asyncio
async def test_a_failed_readiness_call_is_not_reused():
    deployment = Deployment(serve_error(BackPressureError(num_queued_requests=64, max_queued_requests=64)))
    async with client(deployment) as proxy:
        for _ in range(3):
            assert_problem(await proxy.get("/v1/ready"), 503, "service-unavailable")
    assert deployment.calls == 3


@pytest.mark.asyncio
async def test_the_ingress_json_503_readiness_passes_untouched():
    answer = [
        {"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]},
        {"type": "http.response.body", "body": b'{"status":"unavailable"}'},
    ]
    async with client(Deployment(lambda request_id: answer)) as proxy:
        response = await proxy.get("/v1/ready")
    assert response.status_code == 503 and response.json() == {"status": "unavailable"}
