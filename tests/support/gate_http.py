"""Helpers for the HTTP tests of the ingress's gate (tests/test_auth_http.py, tests/test_traffic_http.py).

The gate probe is the cheapest request that still walks every gate step: a POST /v1/align whose
body is not multipart. The gate (client IP, bans, pre-auth bucket, authentication, scope, shedding,
request token) decides before the body is read, so a request it lets through is then refused 415
`multipart-required`, and one it refuses gets the gate's own answer. No upload is parsed or scanned.
"""

from __future__ import annotations

import re
import time
from typing import Callable

import httpx

PASSED_GATE = 415  # what a gate probe gets once the gate has let it through
IANA_PROBLEM_TYPES = "https://iana.org/assignments/http-problem-types#"
_CHALLENGE_PARAMETER = re.compile(r'([A-Za-z_]+)="([^"]*)"')


def gate_probe(client: httpx.Client, prefix: str = "", headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post(
        f"{prefix}/v1/align", content=b"not a multipart form", headers={"Content-Type": "text/plain", **(headers or {})}
    )


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def session(base_url: str, credential: str, extra_headers: dict[str, str] | None = None) -> httpx.Client:
    """A client that sends `credential` with every request (use it in a with-block)."""
    return httpx.Client(base_url=base_url, timeout=120, headers={**bearer(credential), **(extra_headers or {})})


def from_ip(address: str) -> dict[str, str]:
    """Act as `address`: the test config trusts loopback as a proxy, so X-Forwarded-For is believed."""
    return {"X-Forwarded-For": address}


def challenge(response: httpx.Response) -> dict[str, str]:
    """The parameters of a `WWW-Authenticate: Bearer k="v", ...` challenge (RFC 6750 §3)."""
    value = response.headers["www-authenticate"]
    assert value.startswith("Bearer "), value
    return dict(_CHALLENGE_PARAMETER.findall(value))


def assert_iana_problem(response: httpx.Response, status: int, slug: str) -> dict:
    """A problem document whose type is an IANA-registered problem type (ratelimit-headers draft)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == IANA_PROBLEM_TYPES + slug
    assert body["status"] == status
    return body


def retry_after_s(response: httpx.Response) -> int:
    value = int(response.headers["retry-after"])
    assert value >= 1
    return value


def poll(send: Callable[[], httpx.Response], done: Callable[[httpx.Response], bool], timeout_s: float) -> tuple[httpx.Response, float]:
    """Send until `done(response)` or `timeout_s` passes; the last response and the seconds it took.

    The caller asserts `done` on the result, so a timeout fails with the last answer in view.
    """
    started = time.monotonic()
    while True:
        response = send()
        elapsed_s = time.monotonic() - started
        if done(response) or elapsed_s > timeout_s:
            return response, elapsed_s
        time.sleep(0.2)
