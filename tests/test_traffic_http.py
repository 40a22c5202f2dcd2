"""Traffic control through the real Serve graph (issue 5), over HTTP: token buckets shared by the
ingress replicas, rate-limit headers, the audio-seconds budget, abuse bans, and load shedding.

Buckets and bans live in the session's real Redis. The "qwen3" app runs with the test abuse and
shedding knobs of tests/conftest.py (TEST_ABUSE, TEST_SHEDDING); the "aligner" app with the YAML's.
Clients act as documentation addresses (203.0.113.0/24) through X-Forwarded-For, which the test
config believes from loopback; loopback itself is never banned.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

import http_sfv
import httpx
import pytest
from ray import serve

from serve_app.security.api_keys import format_api_key
from tests.conftest import TEST_ABUSE, TEST_PLANS, create_api_key
from tests.support.audio import silence_flac
from tests.support.cluster import logs_dir
from tests.support.gate_http import (
    PASSED_GATE,
    assert_iana_problem,
    bearer,
    from_ip,
    gate_probe,
    poll,
    retry_after_s,
    session,
)
from tests.support.hostile import tone_wav
from tests.test_api import assert_problem, eval_clip, post_align

QWEN3 = "/qwen3"
SLACK_S = 5.0  # request latency on a loaded 2-core box
SHEDDER_SETTLE_S = 30.0  # the shedder samples about once a second; generous for CI


def _new_key(redis_server, plan: str) -> str:
    return create_api_key(redis_server, f"traffic-test-{uuid.uuid4().hex[:8]}", ["align"], plan)


def _policies(field: str) -> dict[str, dict]:
    """A RateLimit or RateLimit-Policy field, parsed as a Structured Field List: name -> parameters."""
    parsed = http_sfv.List()
    parsed.parse(field.encode("ascii"))
    return {item.value: dict(item.params) for item in parsed}


def _batched_jobs(app_name: str) -> int:
    sizes = serve.get_deployment_handle("Aligner", app_name=app_name).batch_sizes.remote().result()
    return sum(size * count for size, count in sizes.items())


# -- token buckets ---------------------------------------------------------------------------------


def _ingress_replicas_that_answered(responses: list[httpx.Response]) -> set[str]:
    """Which "aligner" Ingress replicas logged these requests (Serve's access log names the request id)."""
    request_ids = {response.headers["x-request-id"] for response in responses}
    answered: set[str] = set()
    for log in (logs_dir() / "serve").glob("replica_aligner_Ingress_*.log"):
        text = log.read_text(errors="replace")
        if any(request_id in text for request_id in request_ids):
            answered.add(log.stem.rsplit("_", 1)[-1])
    return answered


def test_request_bucket_holds_across_both_ingress_replicas(serve_url, redis_server):
    ingress = serve.status().applications["aligner"].deployments["Ingress"]
    assert ingress.replica_states == {"RUNNING": 2}
    burst = TEST_PLANS["five-requests"]["requests_burst"]
    with session(serve_url, _new_key(redis_server, "five-requests")) as caller:
        with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
            responses = list(pool.map(lambda _: gate_probe(caller), range(4 * burst)))
    # Both replicas took part: one shared bucket, not one per replica, admitted exactly the burst.
    deadline = time.monotonic() + SLACK_S  # access log lines may land just after the answers
    while len(_ingress_replicas_that_answered(responses)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(_ingress_replicas_that_answered(responses)) == 2
    admitted = [response for response in responses if response.status_code != 429]
    assert len(admitted) == burst, [response.status_code for response in responses]
    assert all(response.status_code == PASSED_GATE for response in admitted)
    for refused in (response for response in responses if response.status_code == 429):
        assert assert_iana_problem(refused, 429, "quota-exceeded")["violated-policies"] == ["requests"]
        retry_after_s(refused)
        assert _policies(refused.headers["ratelimit"])["requests"]["r"] == 0


def test_answers_carry_rate_limit_headers_as_structured_fields(serve_url, redis_server, eval_utterances):
    plan = TEST_PLANS["ten-audio-seconds"]
    utterance = eval_utterances[0]
    with session(serve_url, _new_key(redis_server, "ten-audio-seconds")) as caller:
        response = post_align(caller, eval_clip(utterance), utterance["transcript"])
    assert response.status_code == 200, response.text
    policy, remaining = _policies(response.headers["ratelimit-policy"]), _policies(response.headers["ratelimit"])
    assert {"requests", "audio-seconds"} <= set(policy) and set(policy) == set(remaining)
    assert (policy["requests"]["q"], policy["requests"]["w"]) == (plan["requests_burst"], 60)
    assert policy["audio-seconds"]["q"] == plan["audio_seconds_burst"]
    assert policy["audio-seconds"]["aligner-unit"] == "audio-seconds"
    assert remaining["requests"]["r"] == plan["requests_burst"] - 1
    assert remaining["audio-seconds"]["r"] == int(plan["audio_seconds_burst"] - utterance["duration"])
    assert policy["requests"]["pk"] == policy["audio-seconds"]["pk"]  # one principal, one partition


def test_audio_seconds_budget_refuses_before_the_aligner(serve_url, redis_server, eval_utterances):
    clips = [utterance for utterance in eval_utterances if utterance["duration"] < 3.0][:4]
    assert sum(clip["duration"] for clip in clips[:3]) <= TEST_PLANS["ten-audio-seconds"]["audio_seconds_burst"]
    assert sum(clip["duration"] for clip in clips) > TEST_PLANS["ten-audio-seconds"]["audio_seconds_burst"]
    with session(serve_url, _new_key(redis_server, "ten-audio-seconds")) as caller:
        before = _batched_jobs("aligner")
        for clip in clips[:3]:
            response = post_align(caller, eval_clip(clip), clip["transcript"])
            assert response.status_code == 200, response.text
        assert _batched_jobs("aligner") == before + 3

        refused = post_align(caller, eval_clip(clips[3]), clips[3]["transcript"])
    assert assert_iana_problem(refused, 429, "quota-exceeded")["violated-policies"] == ["audio-seconds"]
    retry_after_s(refused)
    assert _batched_jobs("aligner") == before + 3  # refused after the scan, before the aligner


# -- abuse: bans from credential stuffing ----------------------------------------------------------


def _stuff_until_banned(anonymous, address: str) -> list[int]:
    """Send well-formed keys that do not exist from `address` until it is refused; the statuses."""
    statuses: list[int] = []
    while len(statuses) < 3 * TEST_ABUSE["max_auth_failures"]:
        guessed = format_api_key(uuid.uuid4().hex[:12], uuid.uuid4().hex)
        response = gate_probe(anonymous, QWEN3, {**bearer(guessed), **from_ip(address)})
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert_iana_problem(response, 429, "abnormal-usage-detected")
            break
    return statuses


def test_credential_stuffing_bans_the_address_until_the_ban_ends(anonymous, align_key):
    stuffer, neighbour = "203.0.113.10", "203.0.113.11"
    assert _stuff_until_banned(anonymous, stuffer) == [401] * TEST_ABUSE["max_auth_failures"] + [429]

    def with_valid_key(address: str) -> httpx.Response:
        return gate_probe(anonymous, QWEN3, {**bearer(align_key), **from_ip(address)})

    refused = with_valid_key(stuffer)
    assert_iana_problem(refused, 429, "abnormal-usage-detected")
    assert retry_after_s(refused) <= TEST_ABUSE["ban_s"]
    assert with_valid_key(neighbour).status_code == PASSED_GATE

    response, _ = poll(lambda: with_valid_key(stuffer), lambda r: r.status_code != 429, TEST_ABUSE["ban_s"] + SLACK_S)
    assert response.status_code == PASSED_GATE, response.text


def test_admin_lists_and_lifts_a_ban(anonymous, serve_url, align_key, admin_key):
    stuffer = "203.0.113.12"
    subject = f"ip:{stuffer}"

    def with_valid_key() -> httpx.Response:
        return gate_probe(anonymous, QWEN3, {**bearer(align_key), **from_ip(stuffer)})

    with session(serve_url, admin_key) as admin:

        def listed_subjects() -> dict[str, dict]:
            return {ban["subject"]: ban for ban in admin.get(f"{QWEN3}/v1/admin/bans").json()}

        assert _stuff_until_banned(anonymous, stuffer)[-1] == 429

        ban = listed_subjects()[subject]
        assert (ban["reason"], ban["offence"]) == ("auth_failure", 1)
        assert 1 <= ban["retry_after_s"] <= TEST_ABUSE["ban_s"]
        assert with_valid_key().status_code == 429

        lifted = admin.delete(f"{QWEN3}/v1/admin/bans/{subject}")
        assert lifted.status_code == 204, lifted.text
        assert with_valid_key().status_code == PASSED_GATE
        assert subject not in listed_subjects()
        assert_problem(admin.delete(f"{QWEN3}/v1/admin/bans/{subject}"), 404, "not-found")


# -- load shedding ---------------------------------------------------------------------------------


@functools.cache
def _slow_bomb() -> bytes:
    """An hour of 192 kHz 7.1 silence with no declared length: a scanner decodes it until the
    decoding-work cap (~0.2 s) before refusing it, holding one of its scan slots meanwhile."""
    return silence_flac(3600.0, 192_000, 8, declare_length=False)


@contextmanager
def _scanner_backlog(serve_url: str, key: str, workers: int = 3) -> Iterator[None]:
    """Keep `workers` of the qwen3 app's scan slots busy with slow bombs until the block ends."""
    stop = threading.Event()

    def feed() -> None:
        with session(serve_url, key) as caller:
            while not stop.is_set():
                post_align(caller, _slow_bomb(), "hello", prefix=QWEN3)

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        feeders = [pool.submit(feed) for _ in range(workers)]
        try:
            yield
        finally:
            stop.set()
            for feeder in feeders:
                feeder.result()


def _is_shed(response: httpx.Response) -> bool:
    return response.status_code == 503 and response.json()["type"].endswith("#temporary-reduced-capacity")


def test_backlog_sheds_the_standard_plan_but_not_the_top_priority(serve_url, redis_server, client):
    with session(serve_url, _new_key(redis_server, "standard")) as standard:
        with _scanner_backlog(serve_url, _new_key(redis_server, "unlimited")):
            response, _ = poll(lambda: gate_probe(standard, QWEN3), _is_shed, SHEDDER_SETTLE_S)
            assert_iana_problem(response, 503, "temporary-reduced-capacity")
            retry_after_s(response)
            top_priority = post_align(client, tone_wav(), "hello", prefix=QWEN3)  # the "unlimited" plan: priority 10
            assert top_priority.status_code == 200, top_priority.text

        response, _ = poll(lambda: gate_probe(standard, QWEN3), lambda r: not _is_shed(r), SHEDDER_SETTLE_S)
        assert response.status_code == PASSED_GATE, response.text
        served = post_align(standard, tone_wav(), "hello", prefix=QWEN3)
    assert served.status_code == 200, served.text


def test_an_idle_aligner_reports_no_batch_wait(client):
    """The shedder reads the aligner's batch wait. A moving average updated only when a batch runs
    keeps the last spike's value while the aligner is idle; once that value sheds every priority,
    no request reaches the aligner to lower it again, and the service refuses everything for good."""
    aligner = serve.get_deployment_handle("Aligner", app_name="qwen3")
    response = post_align(client, tone_wav(), "hello", prefix=QWEN3)  # a lone job waits out its batch timeout
    assert response.status_code == 200, response.text
    load = aligner.load.remote().result()
    assert (load["aligner_ongoing"], load["aligner_queued"]) == (0, 0)
    assert load["batch_wait_s"] == pytest.approx(0.0)


def test_a_long_alignment_in_progress_sheds_no_one(serve_url, redis_server, client):
    """Issue 10, point 12. PocketSphinx holds the GIL while it aligns, so the aligner answers the
    shedder's load probe late during a long file. A late probe once read as full load: the next
    request was shed, premium or not, even a lone client's right after its own long file.
    Default shedding thresholds (the "aligner" app), so only a real measurement could shed here."""
    with session(serve_url, _new_key(redis_server, "standard")) as standard:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            long_file = pool.submit(post_align, client, tone_wav(60.0), " ".join(["hello"] * 60))
            probes = []
            while not long_file.done():
                probes.append(gate_probe(standard))
                time.sleep(0.2)
        probes += [gate_probe(standard) for _ in range(3)]  # a sequential client's next requests
    assert long_file.result().status_code in (200, 422), long_file.result().text  # it ran to the end
    assert len(probes) > 5  # the long file really kept the aligner busy meanwhile
    assert [response.status_code for response in probes] == [PASSED_GATE] * len(probes), [r.text for r in probes if r.status_code != PASSED_GATE]
