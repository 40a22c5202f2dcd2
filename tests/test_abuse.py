"""Abuse counters and bans against a real redis-server (never a mock).

Each test uses its own addresses and principals, so tests share the session's Redis. The outage test
stops a redis-server of its own instead.
"""

from __future__ import annotations

import asyncio
import ipaddress
import uuid

from typing import get_args

import pytest

from serve_app.media.errors import RejectionReason
from serve_app.security.abuse import AbuseMonitor, ip_subject, principal_subject, refusal_event
from serve_app.security.redis_store import request_path_client
from serve_app.settings import AbuseOptions


def fresh_ip() -> str:
    """An address in a /64 of the IPv6 documentation range that no other test uses (bans are per /64)."""
    random = uuid.uuid4().int
    return str(ipaddress.IPv6Address(0x2001_0DB8 << 96 | (random % 2**32) << 64 | (random >> 64) % 2**64))


def same_block(ip: str, host: int) -> str:
    """Another address of `ip`'s /64."""
    network = ipaddress.IPv6Network((ip, 64), strict=False)
    return str(network.network_address + host)


def next_block(ip: str) -> str:
    """An address of the /64 right after `ip`'s."""
    network = ipaddress.IPv6Network((ip, 64), strict=False)
    return str(network.network_address + 2**64 + 1)


def fresh_principal() -> str:
    return f"api_key:{uuid.uuid4().hex[:12]}"


def options(**overrides) -> AbuseOptions:
    return AbuseOptions(**{"allow_networks": [], "ban_s": 1, "max_ban_s": 3, **overrides})


def one_hit_bans(**overrides) -> AbuseOptions:
    """Ban on the first malware hit, so the ban mechanics below need one event each."""
    return options(max_malware_hits=1, **overrides)


@pytest.mark.asyncio
async def test_credential_stuffing_loop_bans_the_address(redis_client):
    monitor = AbuseMonitor(redis_client, options(max_auth_failures=5))
    attacker, bystander = fresh_ip(), fresh_ip()
    imposed = [await monitor.record("auth_failure", attacker) for _ in range(5)]
    assert imposed[:4] == [[]] * 4
    assert [(ban.subject, ban.reason, ban.offence, ban.duration_s) for ban in imposed[4]] == [
        (ip_subject(attacker), "auth_failure", 1, 1)
    ]
    ban = await monitor.is_banned(attacker)
    assert ban is not None and ban.reason == "auth_failure" and 0 < ban.retry_after_s <= 1
    assert await monitor.is_banned(bystander) is None


@pytest.mark.asyncio
async def test_events_outside_the_window_do_not_count(redis_client):
    monitor = AbuseMonitor(redis_client, options(window_s=1, max_auth_failures=3))
    ip = fresh_ip()
    for _ in range(2):
        await monitor.record("auth_failure", ip)
    await asyncio.sleep(1.1)
    assert await monitor.record("auth_failure", ip) == []
    assert await monitor.is_banned(ip) is None


def test_only_malware_among_scanner_refusals_counts_toward_bans():
    # Every reason the decoder and sniffer can refuse with is something an honest client's real
    # file can earn (a format we do not take, a long recording, a video): none may count.
    assert {reason: refusal_event(reason) for reason in get_args(RejectionReason)} == dict.fromkeys(get_args(RejectionReason))
    assert refusal_event("malware-detected") == "malware"
    assert refusal_event("a-refusal-added-later") is None  # unclassified means benign, never a ban


@pytest.mark.asyncio
async def test_no_refusal_event_other_than_hostile_ones_exists(redis_client):
    monitor = AbuseMonitor(redis_client, options())
    with pytest.raises(ValueError):
        await monitor.record("rejected_upload", fresh_ip())


@pytest.mark.asyncio
async def test_one_malware_hit_does_not_ban_and_repeated_hits_ban_the_address_and_the_principal(redis_client):
    monitor = AbuseMonitor(redis_client, options())  # max_malware_hits defaults to 3
    ip, principal = fresh_ip(), fresh_principal()
    assert AbuseOptions().max_malware_hits == 3
    for _ in range(2):  # a false positive, and a retry of the same file
        assert await monitor.record("malware", ip, principal) == []
    assert await monitor.is_banned(ip, principal) is None
    imposed = await monitor.record("malware", ip, principal)
    assert {ban.subject for ban in imposed} == {ip_subject(ip), principal_subject(principal)}
    assert (await monitor.is_banned(fresh_ip(), principal)).subject == principal_subject(principal)
    assert (await monitor.is_banned(ip, None)).subject == ip_subject(ip)


@pytest.mark.asyncio
async def test_ban_expires(redis_client):
    monitor = AbuseMonitor(redis_client, one_hit_bans())
    ip = fresh_ip()
    await monitor.record("malware", ip)
    assert await monitor.is_banned(ip) is not None
    await asyncio.sleep(1.1)
    assert await monitor.is_banned(ip) is None


@pytest.mark.asyncio
async def test_repeat_offences_double_the_ban_up_to_the_cap(redis_client):
    monitor = AbuseMonitor(redis_client, one_hit_bans(ban_s=1, max_ban_s=3))
    ip = fresh_ip()
    durations = []
    for _ in range(3):
        [ban] = await monitor.record("malware", ip)
        durations.append((ban.offence, ban.duration_s))
        while await monitor.is_banned(ip) is not None:
            await asyncio.sleep(0.05)
    assert durations == [(1, 1), (2, 2), (3, 3)]


@pytest.mark.asyncio
async def test_offences_are_forgotten_after_the_memory(redis_client):
    monitor = AbuseMonitor(redis_client, one_hit_bans(ban_s=1, offence_memory_s=1))
    ip = fresh_ip()
    await monitor.record("malware", ip)
    await asyncio.sleep(2.1)  # the 1 s ban, then the 1 s memory
    [ban] = await monitor.record("malware", ip)
    assert ban.offence == 1 and ban.duration_s == 1


@pytest.mark.asyncio
async def test_allow_listed_network_is_never_banned_but_its_principal_can_be(redis_client):
    monitor = AbuseMonitor(redis_client, one_hit_bans(allow_networks=["127.0.0.0/8", "2001:db8:1::/48"]))
    principal = fresh_principal()
    for ip in ("127.0.0.1", "2001:db8:1::5"):
        for _ in range(3):
            await monitor.record("malware", ip, principal if ip == "127.0.0.1" else None)
        assert await monitor.is_banned(ip) is None
    assert (await monitor.is_banned("127.0.0.1", principal)).subject == principal_subject(principal)


@pytest.mark.asyncio
async def test_list_and_lift(redis_client):
    monitor = AbuseMonitor(redis_client, one_hit_bans(ban_s=60, max_ban_s=60))
    ip, principal = fresh_ip(), fresh_principal()
    await monitor.record("malware", ip, principal)
    listed = {ban.subject: ban for ban in await monitor.list_bans()}
    assert {ip_subject(ip), principal_subject(principal)} <= set(listed)
    assert listed[ip_subject(ip)].reason == "malware" and 55 < listed[ip_subject(ip)].retry_after_s <= 60

    assert await monitor.lift(ip_subject(ip)) is True
    assert await monitor.is_banned(ip) is None
    assert await monitor.lift(ip_subject(ip)) is False
    assert ip_subject(ip) not in {ban.subject for ban in await monitor.list_bans()}
    # Lifting forgets the offences: the next ban is a first one again.
    [again] = await monitor.record("malware", ip)
    assert again.offence == 1
    for subject in (ip_subject(ip), principal_subject(principal)):
        await monitor.lift(subject)


@pytest.mark.asyncio
async def test_unknown_event_and_subject_are_refused(redis_client):
    monitor = AbuseMonitor(redis_client, options())
    with pytest.raises(ValueError):
        await monitor.record("sneezing", fresh_ip())
    with pytest.raises(ValueError):
        await monitor.lift("abuse:ban:ip:1.2.3.4")


@pytest.mark.asyncio
async def test_redis_outage_fails_open_and_recovers(private_redis_server):
    async with request_path_client(private_redis_server.url) as redis_client:
        monitor = AbuseMonitor(redis_client, one_hit_bans())
        ip = fresh_ip()
        private_redis_server.stop()
        try:
            assert await monitor.is_banned(ip) is None
            assert await monitor.record("malware", ip) == []
            assert monitor.store_health.failures == 2
        finally:
            private_redis_server.start()
        assert [ban.subject for ban in await monitor.record("malware", ip)] == [ip_subject(ip)]
        assert await monitor.is_banned(ip) is not None


@pytest.mark.asyncio
async def test_an_ipv6_client_is_banned_by_its_64_and_its_neighbours_are_not(redis_client):
    monitor = AbuseMonitor(redis_client, options(max_auth_failures=3))
    ip = fresh_ip()
    hopping = [same_block(ip, host) for host in (1, 2, 0xFFFF_FFFF)]  # a new address for each try
    imposed = [await monitor.record("auth_failure", address) for address in hopping]
    assert [ban.subject for ban in imposed[-1]] == [ip_subject(ip)] and ip_subject(ip).endswith("::/64")
    assert (await monitor.is_banned(same_block(ip, 12345))).subject == ip_subject(ip)
    assert await monitor.is_banned(next_block(ip)) is None
    await monitor.lift(ip_subject(ip))


@pytest.mark.asyncio
async def test_lift_accepts_the_listed_block_or_any_address_in_it(redis_client):
    monitor = AbuseMonitor(redis_client, one_hit_bans(ban_s=60, max_ban_s=60))
    ip = fresh_ip()
    [ban] = await monitor.record("malware", ip)
    assert ban.subject in {listed.subject for listed in await monitor.list_bans()}
    assert await monitor.lift(f"ip:{same_block(ip, 99)}") is True
    assert await monitor.is_banned(ip) is None
    await monitor.record("malware", ip)
    assert await monitor.lift(ban.subject) is True  # as listed: "ip:2001:db8:...::/64"
    assert await monitor.is_banned(ip) is None


@pytest.mark.asyncio
async def test_a_ban_read_with_a_rate_limit_decision_is_the_ban_is_banned_reads(redis_client):
    """The request path reads bans in the token-bucket call (serve_app.api.gate): same answer, one round trip."""
    from serve_app.security.ratelimit import TokenBucketLimiter

    monitor, limiter = AbuseMonitor(redis_client, one_hit_bans()), TokenBucketLimiter(redis_client)
    ip, principal = fresh_ip(), fresh_principal()
    check = monitor.ban_check(ip, principal)
    decision = await limiter.take(principal, 10, 0.001, policy="requests", blockers=check.keys)
    assert monitor.ban_found(check, decision.blocked_by) is None
    await monitor.record("malware", ip, principal)
    decision = await limiter.take(principal, 10, 0.001, policy="requests", blockers=check.keys)
    found, read_alone = monitor.ban_found(check, decision.blocked_by), await monitor.is_banned(ip, principal)
    assert found is not None and found == read_alone and found.reason == "malware"
    assert decision.remaining == pytest.approx(9, abs=0.01)  # the banned take charged nothing
