"""Slow senders and honest uploads through the real Serve graph (issue 10, points 3 and 5).

The "aligner" app runs two ingress replicas, so a principal's concurrency cap is shown to hold
across replicas; the "qwen3" app cuts a silent upload off after TEST_UPLOAD_IDLE_TIMEOUT_S.
Slow uploads are raw sockets that send their headers and the start of a body, then stop.
"""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack
from urllib.parse import urlsplit

import redis

from serve_app.security.api_keys import parse_api_key
from serve_app.security.principal_concurrency import KEY_PREFIX
from tests.conftest import TEST_UPLOAD_IDLE_TIMEOUT_S, create_api_key
from tests.support.gate_http import assert_iana_problem, poll, retry_after_s, session
from tests.test_api import assert_problem, eval_clip, post_align

BOUNDARY = "slowsenderboundary"


def slow_upload(serve_url: str, key: str, path: str = "/v1/align") -> socket.socket:
    """An upload that sends its headers and 100 bytes of a 100 kB body, then nothing."""
    address = urlsplit(serve_url)
    connection = socket.create_connection((address.hostname, address.port))
    connection.sendall(
        f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: 100000\r\n\r\n".encode()
        + f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n\r\n'.encode()
    )
    return connection


def wait_for_leases(redis_server, key: str, count: int, timeout_s: float = 8.0) -> bool:
    """Whether `key`'s principal comes to hold `count` concurrency leases within `timeout_s`."""
    leases = f"{KEY_PREFIX}:api_key:{parse_api_key(key).key_id}"
    client = redis.Redis.from_url(redis_server.url)
    deadline = time.monotonic() + timeout_s
    try:
        while client.zcard(leases) != count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True
    finally:
        client.close()


def test_one_principal_holds_at_most_its_plans_concurrent_requests_across_replicas(serve_url, redis_server, eval_utterances):
    hog, other = (create_api_key(redis_server, owner, ["align"], "two-at-once") for owner in ("hog", "other"))
    audio, text = eval_clip(eval_utterances[0]), eval_utterances[0]["transcript"]
    with session(serve_url, hog) as hog_client, session(serve_url, other) as other_client:
        with ExitStack() as held:  # the "aligner" app cuts these off itself after 10 s of silence
            for _ in range(2):
                held.enter_context(slow_upload(serve_url, hog))
            assert wait_for_leases(redis_server, hog, 2)
            refused = post_align(hog_client, audio, text)
            body = assert_iana_problem(refused, 429, "quota-exceeded")
            assert body["violated-policies"] == ["concurrency"] and retry_after_s(refused) >= 1
            assert post_align(other_client, audio, text).status_code == 200  # another principal is not held up
        # The slow uploads' connections closed: their leases are released, on whichever replica held them.
        freed, _ = poll(lambda: post_align(hog_client, audio, text), lambda response: response.status_code == 200, timeout_s=30)
        assert freed.status_code == 200, freed.text


def test_a_silent_upload_gets_a_408_problem_and_frees_its_slot(serve_url, redis_server, eval_utterances):
    key = create_api_key(redis_server, "silent", ["align"], "two-at-once")
    started = time.monotonic()
    connections = [slow_upload(serve_url, key, "/qwen3/v1/align") for _ in range(2)]
    answers = []
    for connection in connections:
        with connection:
            connection.settimeout(TEST_UPLOAD_IDLE_TIMEOUT_S + 30)
            answer = b""
            while not answer.endswith(b"}"):  # the whole problem document (Serve closes or keeps the connection)
                chunk = connection.recv(65536)
                if not chunk:
                    break
                answer += chunk
            answers.append(answer.decode("latin-1"))
    assert time.monotonic() - started < TEST_UPLOAD_IDLE_TIMEOUT_S + 30
    for answer in answers:
        head, _, body = answer.partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 408"), answer
        assert "application/problem+json" in head and "urn:forced-aligner:problem:request-timeout" in body
    with session(serve_url, key) as client:  # both of the key's two slots are free again
        response = post_align(client, eval_clip(eval_utterances[0]), eval_utterances[0]["transcript"], prefix="/qwen3")
    assert response.status_code == 200, response.text


def test_a_body_without_its_closing_boundary_is_refused(client, eval_utterances):
    request = client.build_request(
        "POST", "/v1/align", files={"audio": ("a.wav", eval_clip(eval_utterances[0]), "audio/wav")}, data={"text": "the words end in what"}
    )
    truncated = request.read()[:-22]
    response = client.post(
        "/v1/align", content=truncated, headers={"Content-Type": request.headers["Content-Type"]}
    )
    body = assert_problem(response, 400, "invalid-request")
    assert "closing multipart boundary" in body["detail"]


def test_invisible_characters_follow_the_documented_rule(client, eval_utterances):
    utterance = eval_utterances[0]
    audio, text = eval_clip(utterance), utterance["transcript"]
    body = assert_problem(post_align(client, audio, text.replace(" ", " \u200b", 1)), 422, "invalid-transcript")
    assert "U+200B" in body["detail"]
    assert_problem(post_align(client, audio, "\u200f" + text), 422, "invalid-transcript")
    response = post_align(client, audio, "\ufeff" + text)  # a leading byte-order mark is removed
    assert response.status_code == 200, response.text
    assert [word["text"] for word in response.json()["words"]] == text.split()
