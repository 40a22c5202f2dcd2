"""Token buckets and rate-limit policies against a real redis-server (never a mock).

Every test uses its own keys, so tests share the session's Redis without interfering. The outage
tests stop a redis-server of their own instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import time
import uuid

import http_sfv
import pytest

from serve_app.security.concurrency import ConcurrencyCapReached
from serve_app.security.principal import Principal
from serve_app.security.ratelimit import (
    AUDIO_SECONDS_POLICY,
    KEY_PREFIX,
    PRE_AUTH_POLICY,
    REQUESTS_POLICY,
    RateLimiter,
    TokenBucketLimiter,
    principal_key,
)
from serve_app.security.ratelimit_headers import VENDOR_UNIT_PARAMETER, rate_limit_headers
from serve_app.security.redis_store import request_path_client
from serve_app.settings import Plan, RateLimitOptions

ALMOST_NO_REFILL = 1e-6  # tokens per second: nothing refills during a test


def unique(prefix: str = "k") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


ISSUER = "https://issuer.example/"


def principal(method: str = "api_key", id: str | None = None, issuer: str | None = ISSUER) -> Principal:
    return Principal(
        method=method, id=id or unique("key"), scopes=frozenset({"align"}), plan="standard", issuer=issuer if method == "jwt" else None
    )


def parse_list(value: str) -> http_sfv.List:
    parsed = http_sfv.List()
    parsed.parse(value.encode("ascii"))
    return parsed


# --- the token bucket ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_concurrent_takes_from_two_replicas_admit_exactly_capacity(redis_server):
    # Atomicity, not latency: clients with a generous timeout, so that opening 2 x 64 connections
    # on a loaded machine is not mistaken for an outage (it was, at load average 20+).
    clients = [request_path_client(redis_server.url, timeout_s=5) for _ in range(2)]
    replicas = [TokenBucketLimiter(client) for client in clients]
    key = unique()
    try:
        decisions = await asyncio.gather(
            *(replicas[index % 2].take(key, 50, ALMOST_NO_REFILL, policy="atomicity") for index in range(200))
        )
    finally:
        for client in clients:
            await client.aclose()
    assert not any(decision.store_error for decision in decisions)
    assert sum(decision.allowed for decision in decisions) == 50
    assert min(decision.remaining for decision in decisions) == pytest.approx(0, abs=1e-3)


@pytest.mark.asyncio
async def test_bucket_refills_with_elapsed_time(redis_client):
    limiter = TokenBucketLimiter(redis_client)
    key = unique()
    for _ in range(2):
        assert (await limiter.take(key, 2, 10, policy="refill")).allowed
    denied = await limiter.take(key, 2, 10, policy="refill")
    assert not denied.allowed
    assert 0 < denied.retry_after_s <= 0.1
    assert denied.retry_after_s <= denied.reset_s <= 0.2
    await asyncio.sleep(denied.retry_after_s + 0.02)
    assert (await limiter.take(key, 2, 10, policy="refill")).allowed


@pytest.mark.asyncio
async def test_fractional_costs_and_overdraw_charges_nothing(redis_client):
    limiter = TokenBucketLimiter(redis_client)
    key = unique()
    for expected_remaining in (7.5, 5.0, 2.5):
        decision = await limiter.take(key, 10, ALMOST_NO_REFILL, 2.5, policy="fractional")
        assert decision.allowed and decision.remaining == pytest.approx(expected_remaining, abs=1e-3)
    overdraw = await limiter.take(key, 10, ALMOST_NO_REFILL, 2.6, policy="fractional")
    assert not overdraw.allowed and overdraw.remaining == pytest.approx(2.5, abs=1e-3)
    exact = await limiter.take(key, 10, ALMOST_NO_REFILL, 2.5, policy="fractional")
    assert exact.allowed and exact.remaining == pytest.approx(0, abs=1e-3)


@pytest.mark.asyncio
async def test_asking_without_charge_writes_nothing(redis_client):
    limiter = TokenBucketLimiter(redis_client)
    key = unique()
    assert (await limiter.take(key, 5, ALMOST_NO_REFILL, 5, policy="peek", charge=False)).allowed
    assert not await redis_client.exists(f"{KEY_PREFIX}:peek:{key}")
    assert not (await limiter.take(key, 5, ALMOST_NO_REFILL, 6, policy="peek", charge=False)).allowed
    assert (await limiter.take(key, 5, ALMOST_NO_REFILL, 5, policy="peek")).allowed


@pytest.mark.asyncio
async def test_a_take_reads_its_blocking_keys_in_the_same_call_and_charges_nothing_while_one_exists(redis_client):
    """Bans ride on the bucket's round trip (serve_app.api.gate): read, and no token taken from a banned caller."""
    limiter = TokenBucketLimiter(redis_client)
    key, absent, present = unique(), f"test:blocker:{unique()}", f"test:blocker:{unique()}"
    free = await limiter.take(key, 5, ALMOST_NO_REFILL, 1, policy="blocked", blockers=[absent])
    assert free.allowed and free.remaining == pytest.approx(4, abs=1e-3) and free.blocked_by == ((None, -2),)
    await redis_client.set(present, '{"reason": "malware"}', px=60_000)
    blocked = await limiter.take(key, 5, ALMOST_NO_REFILL, 1, policy="blocked", blockers=[absent, present])
    (absent_read, (value, ttl_ms)) = blocked.blocked_by
    assert absent_read == (None, -2) and value == '{"reason": "malware"}' and 59_000 < ttl_ms <= 60_000
    assert blocked.remaining == pytest.approx(4, abs=1e-3)  # nothing charged
    assert (await limiter.take(key, 5, ALMOST_NO_REFILL, 1, policy="blocked")).remaining == pytest.approx(3, abs=1e-3)


@pytest.mark.asyncio
async def test_bucket_key_expires_once_it_would_be_full(redis_client):
    limiter = TokenBucketLimiter(redis_client)
    key = unique()
    await limiter.take(key, 5, 100, 1, policy="expiry")  # full again after 10 ms
    assert 0 < await redis_client.pttl(f"{KEY_PREFIX}:expiry:{key}") <= 10
    await asyncio.sleep(0.05)
    assert not await redis_client.exists(f"{KEY_PREFIX}:expiry:{key}")


@pytest.mark.asyncio
async def test_script_is_reloaded_after_the_script_cache_is_flushed(redis_client):
    limiter = TokenBucketLimiter(redis_client)
    key = unique()
    assert (await limiter.take(key, 5, 1, policy="noscript")).allowed
    await redis_client.script_flush()
    decision = await limiter.take(key, 5, 1, policy="noscript")
    assert decision.allowed and decision.remaining == pytest.approx(3, abs=0.1)


# --- the policies --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pre_auth_limit_is_per_client_ip(redis_client):
    limiter = RateLimiter(TokenBucketLimiter(redis_client), RateLimitOptions(pre_auth_burst=3, pre_auth_per_minute=0.001))
    ip, other_ip = f"198.51.100.{uuid.uuid4().int % 250}", unique("peer")
    decisions = [await limiter.take_pre_auth(ip) for _ in range(4)]
    assert [decision.allowed for decision in decisions] == [True, True, True, False]
    assert {decision.policy for decision in decisions} == {PRE_AUTH_POLICY}
    assert (await limiter.take_pre_auth(other_ip)).allowed


@pytest.mark.asyncio
async def test_pre_auth_limit_is_per_ipv6_64(redis_client):
    limiter = RateLimiter(TokenBucketLimiter(redis_client), RateLimitOptions(pre_auth_burst=3, pre_auth_per_minute=0.001))
    block = ipaddress.IPv6Network((0x2001_0DB8 << 96 | (uuid.uuid4().int % 2**32) << 64, 64))
    decisions = [await limiter.take_pre_auth(str(block[host])) for host in (1, 2, 3, 2**64 - 1)]  # a new address each time
    assert [decision.allowed for decision in decisions] == [True, True, True, False]
    assert decisions[0].key == f"ip:{block}"
    next_block = block.network_address + 2**64
    assert (await limiter.take_pre_auth(str(next_block + 1))).allowed


@pytest.mark.asyncio
async def test_request_limit_is_per_principal_and_namespaced_by_method(redis_client):
    limiter = RateLimiter(TokenBucketLimiter(redis_client), RateLimitOptions())
    plan = Plan(requests_burst=2, requests_per_minute=0.001)
    shared_id = unique("client")
    api_key, oauth_client = principal("api_key", shared_id), principal("jwt", shared_id)
    assert [(await limiter.take_request(api_key, plan)).allowed for _ in range(3)] == [True, True, False]
    assert (await limiter.take_request(oauth_client, plan)).allowed


@pytest.mark.asyncio
async def test_oauth_clients_of_two_issuers_with_one_client_id_have_their_own_buckets(redis_client):
    limiter = RateLimiter(TokenBucketLimiter(redis_client), RateLimitOptions())
    plan = Plan(requests_burst=2, requests_per_minute=0.001)
    shared_id = unique("client")
    first, second = principal("jwt", shared_id, "https://a.example/"), principal("jwt", shared_id, "https://b.example/")
    assert [(await limiter.take_request(first, plan)).allowed for _ in range(3)] == [True, True, False]
    assert (await limiter.take_request(second, plan)).allowed


def test_principal_keys_are_unambiguous_and_api_keys_keep_theirs():
    assert principal_key(principal("api_key", "k_123")) == "api_key:k_123"  # existing buckets and bans still apply
    # An issuer URL ending where a client id begins cannot be confused with another issuer's client.
    tricky = {principal_key(principal("jwt", "x:y", "https://a.example/")), principal_key(principal("jwt", "y", "https://a.example/x:"))}
    assert len(tricky) == 2
    key = principal_key(principal("jwt", "batch-worker", "https://a.example/"))
    tag = key.split(":")[1]
    assert key == f"jwt:{tag}:batch-worker" and len(tag) == 16 and "a.example" not in key
    assert principal_key(principal("jwt", "batch-worker", "https://a.example/")) == key  # stable
    with pytest.raises(ValueError):
        principal("jwt", "batch-worker", None)
    with pytest.raises(ValueError):
        Principal(method="api_key", id="k_1", scopes=frozenset(), plan="standard", issuer=ISSUER)


@pytest.mark.asyncio
async def test_audio_seconds_charge_decoded_duration_and_refuse_overdraw(redis_client):
    limiter = RateLimiter(TokenBucketLimiter(redis_client), RateLimitOptions())
    plan = Plan(audio_seconds_burst=30, audio_seconds_per_hour=0.001)
    caller = principal()
    first = await limiter.take_audio_seconds(caller, plan, 20.25)
    assert first.allowed and first.policy == AUDIO_SECONDS_POLICY and first.remaining == pytest.approx(9.75, abs=1e-3)
    assert (await limiter.has_audio_seconds(caller, plan, 9.75)).allowed
    overdraw = await limiter.take_audio_seconds(caller, plan, 9.8)
    assert not overdraw.allowed and overdraw.remaining == pytest.approx(9.75, abs=1e-3)
    assert (await limiter.take_audio_seconds(caller, plan, 9.75)).allowed
    assert not (await limiter.has_audio_seconds(caller, plan)).allowed


@pytest.mark.asyncio
async def test_refund_gives_back_what_was_charged_never_beyond_capacity(redis_client):
    limiter = RateLimiter(TokenBucketLimiter(redis_client), RateLimitOptions())
    plan = Plan(audio_seconds_burst=10, audio_seconds_per_hour=ALMOST_NO_REFILL * 3600)
    caller = principal()
    assert (await limiter.take_audio_seconds(caller, plan, 4.0)).remaining == pytest.approx(6.0, abs=1e-3)
    assert (await limiter.take_audio_seconds(caller, plan, 3.0)).remaining == pytest.approx(3.0, abs=1e-3)
    refunded = await limiter.refund_audio_seconds(caller, plan, 3.0)
    assert refunded.allowed and refunded.remaining == pytest.approx(6.0, abs=1e-3)
    # A refund larger than what is missing (a refund replayed, or a bucket refilled meanwhile) stops
    # at the capacity: refunds never mint extra seconds.
    assert (await limiter.refund_audio_seconds(caller, plan, 100.0)).remaining == pytest.approx(10.0, abs=1e-3)
    assert not (await limiter.take_audio_seconds(caller, plan, 10.5)).allowed
    with pytest.raises(ValueError):
        await limiter.refund_audio_seconds(caller, plan, -1.0)


@pytest.mark.asyncio
async def test_refund_on_a_full_bucket_leaves_it_full(redis_client):
    limiter = RateLimiter(TokenBucketLimiter(redis_client), RateLimitOptions())
    plan = Plan(audio_seconds_burst=10, audio_seconds_per_hour=ALMOST_NO_REFILL * 3600)
    caller = principal()
    assert (await limiter.refund_audio_seconds(caller, plan, 5.0)).remaining == pytest.approx(10.0, abs=1e-3)
    assert (await limiter.take_audio_seconds(caller, plan, 10.0)).allowed
    assert not (await limiter.has_audio_seconds(caller, plan, 0.5)).allowed


@pytest.mark.asyncio
async def test_load_factor_shrinks_capacity(redis_client):
    limiter = RateLimiter(TokenBucketLimiter(redis_client), RateLimitOptions())
    plan = Plan(requests_burst=10, requests_per_minute=0.001)
    caller = principal()
    decisions = [await limiter.take_request(caller, plan, load_factor=0.5) for _ in range(6)]
    assert [decision.allowed for decision in decisions] == [True] * 5 + [False]
    assert decisions[0].limit == 5
    with pytest.raises(ValueError):
        await limiter.take_request(caller, plan, load_factor=0)


# --- Redis failures ------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_outage_follows_the_failure_mode_and_recovers(private_redis_server, fail_open):
    async with request_path_client(private_redis_server.url) as redis_client:
        limiter = RateLimiter(TokenBucketLimiter(redis_client), RateLimitOptions(fail_open=fail_open), unavailable_retry_after_s=7)
        plan = Plan(requests_burst=5, requests_per_minute=0.001)
        caller = principal()
        assert (await limiter.take_request(caller, plan)).allowed
        private_redis_server.stop()
        try:
            started = time.monotonic()
            during = await limiter.take_request(caller, plan)
            assert time.monotonic() - started < 1.0  # a dead store costs milliseconds, not seconds
            assert during.store_error and during.allowed is fail_open and during.error_allowed is fail_open
            assert limiter.store_health.failures == 1
            headers = rate_limit_headers([during])
            assert "RateLimit" not in headers and "RateLimit-Policy" not in headers
            assert headers.get("Retry-After") == (None if fail_open else "7")
            async with limiter.local_slot():  # the local cap never needs Redis
                pass
        finally:
            private_redis_server.start()
        after = await limiter.take_request(caller, plan)  # the stale pooled connection is replaced
        # Redis keeps its append-only file, so the bucket survives the restart (the script is reloaded).
        assert not after.store_error and after.allowed and after.remaining == pytest.approx(3, abs=1e-3)
        assert limiter.store_health.failures == 1


# --- the local concurrency cap -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_local_concurrency_cap_refuses_when_full(redis_client):
    limiter = RateLimiter(TokenBucketLimiter(redis_client), RateLimitOptions(local_max_concurrency=2))
    release = asyncio.Event()
    held = asyncio.Event()

    async def hold_slot():
        async with limiter.local_slot():
            held.set()
            await release.wait()

    holders = [asyncio.create_task(hold_slot()) for _ in range(2)]
    await held.wait()
    await asyncio.sleep(0)
    assert limiter.local_cap.in_use == 2
    with pytest.raises(ConcurrencyCapReached):
        async with limiter.local_slot():
            pass
    assert limiter.local_cap.refused == 1
    release.set()
    await asyncio.gather(*holders)
    async with limiter.local_slot():
        assert limiter.local_cap.in_use == 1
    limiter.reconfigure(RateLimitOptions(local_max_concurrency=1))
    assert limiter.local_cap.limit == 1


# --- headers -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_headers_on_an_admitted_request_are_valid_structured_fields(redis_client):
    limiter = RateLimiter(TokenBucketLimiter(redis_client), RateLimitOptions())
    plan = Plan()  # 60 requests per minute; 1800 audio seconds, refilled at 3600 per hour
    caller = principal()
    decisions = [await limiter.take_request(caller, plan), await limiter.take_audio_seconds(caller, plan, 12.5)]
    headers = rate_limit_headers(decisions)
    assert "Retry-After" not in headers

    policies = {item.value: dict(item.params) for item in parse_list(headers["RateLimit-Policy"])}
    assert policies[REQUESTS_POLICY]["q"] == 60 and policies[REQUESTS_POLICY]["w"] == 60
    audio = policies[AUDIO_SECONDS_POLICY]
    assert audio["q"] == 1800 and audio["w"] == 1800 and audio[VENDOR_UNIT_PARAMETER] == "audio-seconds"
    # The documented partition key: the first 9 bytes of SHA-256 of the bucket's key.
    assert audio["pk"] == policies[REQUESTS_POLICY]["pk"] == hashlib.sha256(f"api_key:{caller.id}".encode()).digest()[:9]

    limits = {item.value: dict(item.params) for item in parse_list(headers["RateLimit"])}
    assert limits[REQUESTS_POLICY]["r"] == 59 and limits[REQUESTS_POLICY]["t"] == 1
    assert limits[AUDIO_SECONDS_POLICY]["r"] == 1787 and limits[AUDIO_SECONDS_POLICY]["t"] == 13


@pytest.mark.asyncio
async def test_headers_on_a_denial_carry_retry_after_and_only_the_denied_policy(redis_client):
    limiter = RateLimiter(TokenBucketLimiter(redis_client), RateLimitOptions())
    plan = Plan(requests_burst=1, requests_per_minute=6)  # one token every 10 s
    caller = principal()
    assert (await limiter.take_request(caller, plan)).allowed
    denied = await limiter.take_request(caller, plan)
    audio = await limiter.take_audio_seconds(caller, plan, 1)
    headers = rate_limit_headers([denied, audio])
    assert headers["Retry-After"] == "10"
    limits = parse_list(headers["RateLimit"])
    assert [item.value for item in limits] == [REQUESTS_POLICY]
    assert dict(limits[0].params)["r"] == 0 and dict(limits[0].params)["t"] == 10
    assert [item.value for item in parse_list(headers["RateLimit-Policy"])] == [REQUESTS_POLICY, AUDIO_SECONDS_POLICY]

