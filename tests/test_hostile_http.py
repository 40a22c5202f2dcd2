"""The hostile corpus through the real graph, clamd outages, and a scanner replica crash.

Uploads go to the tiny-Qwen3 application, whose aligner places any transcript on any audio, so an
accepted upload answers 200 and a refused one its documented problem. After the corpus the service
still serves a valid request. Each case uses a key of its own, so no case's answer depends on
what the abuse counters made of the cases before it.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import create_api_key
from tests.support.audio import encode, tone
from tests.support.hostile import HOSTILE_CASES, HostileCase
from tests.test_api import assert_problem, post_align, wait_for_readiness

QWEN3 = "/qwen3"


@pytest.mark.parametrize("case", HOSTILE_CASES, ids=lambda case: case.name)
def test_hostile_upload_gets_its_documented_answer(client, redis_server, case: HostileCase):
    key = create_api_key(redis_server, "hostile-corpus", ["align"], "unlimited")
    files = {"audio": (case.filename, case.build(), "audio/wav")}
    response = client.post(f"{QWEN3}/v1/align", files=files, data={"text": "hello"}, headers={"Authorization": f"Bearer {key}"})
    if case.accepted:
        assert response.status_code == 200, response.text
    else:
        body = assert_problem(response, case.expected_status, case.expected_slug)
        assert "Signature" not in body["detail"] and "UNOFFICIAL" not in response.text  # names stay in the audit log


def test_still_serving_after_the_corpus(client):
    response = post_align(client, encode(tone(2.0, 16_000), 16_000, "wav"), "still here", prefix=QWEN3)
    assert response.status_code == 200, response.text


def test_clamd_down_fails_closed_then_recovers(client, clamd_server, admin_key):
    audio = encode(tone(1.0, 16_000), 16_000, "wav")
    clamd_server.stop()
    try:
        response = post_align(client, audio, "hello", prefix=QWEN3)
        assert_problem(response, 503, "service-unavailable")
        assert int(response.headers["retry-after"]) >= 1
        ready = wait_for_readiness(client, QWEN3, 503)
        assert ready.json() == {"status": "unavailable", "jobs": "ready"}  # jobs need no clamd once submitted
        report = client.get(f"{QWEN3}/v1/admin/dependencies", headers={"Authorization": f"Bearer {admin_key}"}).json()
        assert report["checks"]["clamd"]["status"] == "unavailable"
        assert report["checks"]["aligner"]["status"] == "ready"
    finally:
        clamd_server.start()
    response = post_align(client, audio, "hello", prefix=QWEN3)  # no restart of anything of ours
    assert response.status_code == 200, response.text
    assert wait_for_readiness(client, QWEN3, 200).status_code == 200


def test_scanner_replica_crash_mid_request_is_a_503_and_serve_replaces_it(client, clamd_server, ray_cluster):
    import concurrent.futures

    from ray import serve

    scanner = serve.get_deployment_handle("Scanner", app_name="qwen3")
    pid = scanner.pid.remote().result()
    audio = encode(tone(1.0, 16_000), 16_000, "wav")
    # A frozen clamd holds the scan (up to clamd_timeout_s), so the replica is surely mid-request
    # when it dies, as it would on a decoder segfault.
    os.kill(clamd_server.process.pid, signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            in_flight = pool.submit(post_align, client, audio, "hello", QWEN3)
            time.sleep(1.0)
            os.kill(pid, signal.SIGKILL)
            response = in_flight.result()
    finally:
        os.kill(clamd_server.process.pid, signal.SIGCONT)
    assert_problem(response, 503, "service-unavailable")

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = post_align(client, audio, "hello", prefix=QWEN3)
        if response.status_code == 200:
            break
        time.sleep(1)
    assert response.status_code == 200, response.text
    assert scanner.pid.remote().result() != pid
