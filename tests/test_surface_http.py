"""The HTTP surface through the real Serve graph: nothing is read or parsed before authentication.

A raw socket sends the headers of a large body and only the first bytes of it, then waits for the
answer: an answer that arrives while almost all of the body is still unsent proves the service
decided without reading it (tests/test_surface.py counts the bytes pulled, in-process).
"""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import pytest

from tests.test_api import assert_problem

GIB = 1024**3


def status_before_the_body(serve_url: str, path: str, headers: dict[str, str], timeout_s: float = 10) -> tuple[int, float]:
    """(status, seconds) of the answer to a 1 GiB POST of which only 64 KiB is ever sent."""
    address = urlsplit(serve_url)
    with socket.create_connection((address.hostname, address.port), timeout=timeout_s) as connection:
        lines = [f"POST {path} HTTP/1.1", f"Host: {address.netloc}", *(f"{name}: {value}" for name, value in headers.items())]
        started = time.monotonic()
        first_bytes = b"{" * 65536
        if headers.get("Transfer-Encoding") == "chunked":
            first_bytes = b"%x\r\n" % len(first_bytes) + first_bytes  # a valid first chunk, and no end
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + first_bytes)
        head = connection.recv(65536)
        elapsed = time.monotonic() - started
    assert head.startswith(b"HTTP/1.1 "), head[:100]
    return int(head.split(b" ", 2)[1]), elapsed


@pytest.mark.parametrize("path", ["/v1/admin/keys", "/v1/admin/keys/k_1/rotate", "/v1/health", "/v1/nope", "/v1/align", "/qwen3/v1/align"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_gigabyte_without_credential_is_answered_before_it_is_sent(serve_url, path, framing):
    headers = {"Content-Type": "application/json"}
    if framing == "content-length":
        headers["Content-Length"] = str(GIB)
    else:
        headers["Transfer-Encoding"] = "chunked"  # no declared size: only counting can stop it
    status, _ = status_before_the_body(serve_url, path, headers)
    # 401 where a credential is needed, else the route's own refusal (POST /v1/health: 405, no route: 404)
    expected = {"/v1/health": 405, "/v1/nope": 404}.get(path, 401)
    assert status == (413 if framing == "content-length" and "/v1/align" not in path else expected), (path, framing, status)


def test_unauthenticated_invalid_admin_body_is_401_not_a_parse_error(anonymous):
    response = anonymous.post("/v1/admin/keys", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_problem(response, 401, "unauthenticated")


def test_admin_create_through_serve_is_not_cached_and_validates_after_auth(anonymous, admin_key):
    auth = {"Authorization": f"Bearer {admin_key}"}
    created = anonymous.post("/v1/admin/keys", json={"owner": "surface-http", "scopes": ["align"]}, headers=auth)
    assert created.status_code == 201, created.text
    assert created.headers["cache-control"] == "no-store"
    body = assert_problem(anonymous.post("/v1/admin/keys", json={"owner": "x"}, headers=auth), 400, "invalid-request")
    assert "scopes" in body["detail"]


def test_dependency_report_needs_the_admin_scope(client, anonymous):
    assert_problem(anonymous.get("/v1/admin/dependencies"), 401, "unauthenticated")
    assert_problem(client.get("/v1/admin/dependencies"), 403, "insufficient-scope")  # an align-only key


def test_unsafe_request_id_is_replaced_everywhere_with_one_id(client):
    response = client.get("/v1/nope", headers={"X-Request-Id": "evil id\tinjected"})
    body = assert_problem(response, 404, "not-found")
    assert response.headers["x-request-id"] != "evil id\tinjected"
    assert body["instance"] == f"urn:request:{response.headers['x-request-id']}"


def test_trailing_slash_is_a_404_without_location(client):
    response = client.post("/v1/align/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert_problem(response, 404, "not-found")
    assert "location" not in response.headers


def test_405_through_serve_names_the_allowed_methods(client):
    response = client.put("/qwen3/v1/admin/keys")
    assert_problem(response, 405, "method-not-allowed")
    assert response.headers["allow"] == "GET, POST"
