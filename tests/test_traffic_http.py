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
import ipaddress
import os
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Callable, Iterator

import http_sfv
import httpx
import pytest
import redis
from ray import serve

from serve_app.security.api_keys import format_api_key, parse_api_key
from serve_app.security.ratelimit import AUDIO_SECONDS_POLICY, KEY_PREFIX
from serve_app.settings import AbuseOptions
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
from tools.local_services import eicar
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


def test_requests_refused_after_the_scan_charge_no_audio_seconds(serve_url, redis_server, eval_utterances):
    bucket = TEST_PLANS["ten-audio-seconds"]["audio_seconds_burst"]
    utterance = next(clip for clip in eval_utterances if clip["duration"] < 3.0)
    with session(serve_url, _new_key(redis_server, "ten-audio-seconds")) as caller:
        implausible = post_align(caller, eval_clip(utterance), "word " * 500)
        assert_problem(implausible, 422, "invalid-transcript")
        assert "audio-seconds" not in _policies(implausible.headers["ratelimit"])
        # Longer than the plan admits: refused as too long, not as over quota (it never fits).
        too_long = post_align(caller, tone_wav(12.0), "hello")
        # The scanner stops decoding at the plan's limit: the detail names the limit that applied.
        assert "10 s limit" in assert_problem(too_long, 422, "audio-too-long")["detail"]
        served = post_align(caller, eval_clip(utterance), utterance["transcript"])
    assert served.status_code == 200, served.text
    assert _policies(served.headers["ratelimit"])["audio-seconds"]["r"] == int(bucket - utterance["duration"])


def _audio_bucket_tokens(redis_server, key: str) -> float | None:
    """The tokens stored for this key's audio-seconds bucket; None when absent (a full bucket)."""
    key_id = parse_api_key(key).key_id
    with redis.Redis.from_url(redis_server.url) as store:
        tokens = store.hget(f"{KEY_PREFIX}:{AUDIO_SECONDS_POLICY}:api_key:{key_id}", "tokens")
    return None if tokens is None else float(tokens)


def test_alignment_failing_on_our_side_refunds_its_audio_seconds(serve_url, redis_server):
    bucket = TEST_PLANS["hour-of-audio"]["audio_seconds_burst"]
    key = _new_key(redis_server, "hour-of-audio")
    aligner = serve.get_deployment_handle("Aligner", app_name="aligner")
    pid = aligner.pid.remote().result()
    audio = tone_wav(60.0)  # PocketSphinx takes seconds over it: the replica dies mid-alignment
    with session(serve_url, key) as caller, concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        in_flight = pool.submit(post_align, caller, audio, "hello world")
        deadline = time.monotonic() + 60
        while _audio_bucket_tokens(redis_server, key) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        charged = _audio_bucket_tokens(redis_server, key)
        assert charged is not None and charged <= bucket - 60.0 + 0.01
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        response = in_flight.result()
    assert_problem(response, 503, "service-unavailable")
    # Full again, at the capacity in force: the shedder shrinks capacities while the aligner is
    # missing, and a refund never lifts a bucket above the capacity in force.
    limit = _policies(response.headers["ratelimit-policy"])["audio-seconds"]["q"]
    assert _policies(response.headers["ratelimit"])["audio-seconds"]["r"] == limit, response.headers
    refunded = _audio_bucket_tokens(redis_server, key)
    assert refunded is None or refunded == pytest.approx(limit, abs=1), (charged, refunded, limit)

    # Leave the session's graph serving: Serve replaces the killed replica.
    deadline = time.monotonic() + 90
    while _aligner_pid_or_none(aligner) in (None, pid) and time.monotonic() < deadline:
        time.sleep(1)
    assert _aligner_pid_or_none(aligner) not in (None, pid)


def _aligner_pid_or_none(aligner) -> int | None:
    try:
        return aligner.pid.remote().result(timeout_s=5)
    except Exception:  # the replica is being replaced: any handle error means "not yet"
        return None


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


def _forwarded_probe(client: httpx.Client, credential: str, forwarded_lines: list[str]) -> httpx.Response:
    """A gate probe whose X-Forwarded-For comes as these separate header lines."""
    headers = [("Content-Type", "text/plain"), ("Authorization", f"Bearer {credential}")]
    headers += [("X-Forwarded-For", line) for line in forwarded_lines]
    return client.post(f"{QWEN3}/v1/align", content=b"not a multipart form", headers=headers)


def _stuff_until_banned(anonymous, address: str | Callable[[int], list[str]]) -> list[int]:
    """Send well-formed keys that do not exist from `address` (or, per attempt, from the
    X-Forwarded-For lines it gives) until it is refused; the statuses."""
    forwarded = address if callable(address) else lambda _: [address]
    statuses: list[int] = []
    while len(statuses) < 3 * TEST_ABUSE["max_auth_failures"]:
        guessed = format_api_key(uuid.uuid4().hex[:12], uuid.uuid4().hex)
        response = _forwarded_probe(anonymous, guessed, forwarded(len(statuses)))
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


def test_a_client_line_of_x_forwarded_for_cannot_get_a_victim_banned(anonymous, align_key):
    # Behind a proxy that adds its own header line, the client's own line names a victim.
    victim, stuffer = "203.0.113.13", "203.0.113.14"
    assert _stuff_until_banned(anonymous, lambda _: [victim, stuffer])[-1] == 429
    assert _forwarded_probe(anonymous, align_key, [victim]).status_code == PASSED_GATE
    assert_iana_problem(_forwarded_probe(anonymous, align_key, [stuffer]), 429, "abnormal-usage-detected")


def test_an_ipv6_client_hopping_addresses_is_banned_by_its_64_and_lifted_as_listed(anonymous, serve_url, align_key, admin_key):
    block = ipaddress.IPv6Network((0x2001_0DB8 << 96 | (uuid.uuid4().int % 2**32) << 64, 64))
    subject = f"ip:{block}"  # "ip:2001:db8:…::/64"
    assert _stuff_until_banned(anonymous, lambda attempt: [str(block[attempt + 1])]) == [401] * TEST_ABUSE["max_auth_failures"] + [429]
    assert_iana_problem(_forwarded_probe(anonymous, align_key, [str(block[2**64 - 2])]), 429, "abnormal-usage-detected")
    neighbour = block.network_address + 2**64 + 1
    assert _forwarded_probe(anonymous, align_key, [str(neighbour)]).status_code == PASSED_GATE
    with session(serve_url, admin_key) as admin:
        listed = {ban["subject"] for ban in admin.get(f"{QWEN3}/v1/admin/bans").json()}
        assert subject in listed
        lifted = admin.delete(f"{QWEN3}/v1/admin/bans/{subject}")
        assert lifted.status_code == 204, lifted.text
    assert _forwarded_probe(anonymous, align_key, [str(block[1])]).status_code == PASSED_GATE


# -- abuse: which refused uploads count ------------------------------------------------------------

NOT_AUDIO = b"Minutes of the meeting, not a recording. " * 64
BENIGN_REFUSALS_SENT = 25  # more than the old 20-refusal threshold that banned for this


def _upload(caller: httpx.Client, audio: bytes, address: str) -> httpx.Response:
    files = {"audio": ("clip.mp4", audio, "video/mp4")}
    return caller.post(f"{QWEN3}/v1/align", files=files, data={"text": "hello"}, headers=from_ip(address))


def test_many_unsupported_uploads_never_ban_the_key_or_the_address(serve_url, redis_server):
    key, office = _new_key(redis_server, "unlimited"), "203.0.113.15"
    with session(serve_url, key) as batch:
        statuses = [_upload(batch, NOT_AUDIO, office).status_code for _ in range(BENIGN_REFUSALS_SENT)]
        assert statuses == [415] * BENIGN_REFUSALS_SENT
        assert gate_probe(batch, QWEN3, from_ip(office)).status_code == PASSED_GATE


def test_repeated_malware_bans_the_key_and_the_address_but_one_hit_does_not(anonymous, serve_url, redis_server, align_key):
    key, sender = _new_key(redis_server, "unlimited"), "203.0.113.16"
    hits = AbuseOptions().max_malware_hits
    with session(serve_url, key) as caller:
        first = _upload(caller, eicar(), sender)
        assert_problem(first, 422, "malware-detected")
        assert gate_probe(caller, QWEN3, from_ip(sender)).status_code == PASSED_GATE  # one hit: refused, not banned
        for _ in range(hits - 1):
            assert_problem(_upload(caller, eicar(), sender), 422, "malware-detected")
        # Checked within the app's 5 s ban: the key from elsewhere, the address with another key.
        assert_iana_problem(gate_probe(caller, QWEN3, from_ip("203.0.113.17")), 429, "abnormal-usage-detected")
        assert_iana_problem(gate_probe(anonymous, QWEN3, {**bearer(align_key), **from_ip(sender)}), 429, "abnormal-usage-detected")


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
    response = post_align(client, tone_wav(), "hello", prefix=QWEN3)
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
