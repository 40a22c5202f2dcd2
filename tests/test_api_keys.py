"""API keys against a real redis-server: format, storage, verification, lifecycle, failure policy."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import uuid

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from serve_app.security import api_keys
from serve_app.security.api_keys import (
    API_KEY_PREFIX,
    ApiKeyStore,
    ApiKeyVerifier,
    UnknownKey,
    format_api_key,
    parse_api_key,
)
from serve_app.security.authenticate import Authenticator, AuthFailure, www_authenticate
from serve_app.security.redis_store import request_path_client
from serve_app.settings import IngressOptions
from tests.support.keys import mistyped

pytestmark = pytest.mark.asyncio


async def command_calls(redis: Redis, command: str) -> int:
    """How many times the server has run `command` (INFO commandstats): real round trips, counted."""
    stats = await redis.info("commandstats")
    return stats.get(f"cmdstat_{command}", {}).get("calls", 0)


def _owner() -> str:
    return f"team-{uuid.uuid4().hex[:8]}"


async def _rejection(verifier: ApiKeyVerifier, text: str) -> AuthFailure:
    with pytest.raises(AuthFailure) as caught:
        await verifier.verify(text)
    assert caught.value.method == "api_key"
    return caught.value


async def test_created_key_parses_offline_and_tampering_is_caught(api_key_store):
    text, record = await api_key_store.create(_owner(), ["align"], "standard")
    parsed = parse_api_key(text)
    assert text.startswith(API_KEY_PREFIX) and parsed is not None and parsed.key_id == record.key_id
    secret_start = len(API_KEY_PREFIX) + len(record.key_id) + 1
    flipped = "A" if text[secret_start] != "A" else "B"
    assert parse_api_key(text[:secret_start] + flipped + text[secret_start + 1 :]) is None
    assert parse_api_key(text[:-1]) is None
    assert parse_api_key("gh" + text[2:]) is None


async def test_valid_key_gives_its_principal_and_redis_holds_only_a_digest(api_key_store, redis_client, api_key_pepper):
    text, record = await api_key_store.create(_owner(), ["align", "admin"], "premium")
    principal = await ApiKeyVerifier(api_key_store).verify(text)
    assert (principal.method, principal.id, principal.plan) == ("api_key", record.key_id, "premium")
    assert principal.scopes == {"align", "admin"}

    secret = parse_api_key(text).secret
    stored = await redis_client.hgetall(f"auth:apikey:{record.key_id}")
    assert not any(secret in value for value in stored.values())
    assert stored["secret_digest"] == hmac.new(api_key_pepper, secret.encode(), hashlib.sha256).hexdigest()


async def test_wrong_secret_and_unknown_key_read_the_same_to_the_client(api_key_store):
    text, record = await api_key_store.create(_owner(), ["align"], "standard")
    verifier = ApiKeyVerifier(api_key_store)
    other_secret = parse_api_key((await api_key_store.create(_owner(), ["align"], "standard"))[0]).secret
    wrong_secret = await _rejection(verifier, format_api_key(record.key_id, other_secret))
    unknown = await _rejection(verifier, format_api_key("Z" * len(record.key_id), other_secret))
    assert (wrong_secret.status, wrong_secret.error, wrong_secret.reason) == (401, "invalid_token", "wrong-secret")
    assert unknown.reason == "unknown-key"
    assert wrong_secret.description == unknown.description


async def test_bad_checksum_and_bad_format_are_rejected_without_a_redis_lookup(api_key_store, redis_client):
    text, _ = await api_key_store.create(_owner(), ["align"], "standard")
    verifier = ApiKeyVerifier(api_key_store)
    lookups_before = await command_calls(redis_client, "hgetall")
    bad_checksum = await _rejection(verifier, mistyped(text))
    bad_format = await _rejection(verifier, "fa_not-a-key")
    assert await command_calls(redis_client, "hgetall") == lookups_before
    assert (bad_checksum.status, bad_checksum.reason) == (401, "bad-checksum")
    assert bad_format.reason == "bad-format"


async def test_expired_key_is_rejected(api_key_store):
    text, _ = await api_key_store.create(_owner(), ["align"], "standard", expires_in_s=0.5)
    verifier = ApiKeyVerifier(api_key_store, cache_s=0)
    await verifier.verify(text)
    await asyncio.sleep(0.6)
    assert (await _rejection(verifier, text)).reason == "expired"


async def test_revocation_takes_effect_within_the_cache_bound(api_key_store):
    cache_s = 0.5
    text, record = await api_key_store.create(_owner(), ["align"], "standard")
    verifier = ApiKeyVerifier(api_key_store, cache_s=cache_s)
    await verifier.verify(text)
    await api_key_store.revoke(record.key_id)
    clock = asyncio.get_running_loop().time
    revoked_at = clock()
    while True:  # accepted only while the record cached before the revocation is fresh
        attempt_at = clock()
        try:
            await verifier.verify(text)
        except AuthFailure as failure:
            assert failure.reason == "revoked"
            break
        assert attempt_at - revoked_at <= cache_s
        await asyncio.sleep(0.05)
    assert (await api_key_store.get(record.key_id)).state(0) == "revoked"


async def test_rotation_keeps_both_keys_live_for_the_overlap_only(api_key_store):
    owner = _owner()
    old_text, old = await api_key_store.create(owner, ["align"], "premium", expires_in_s=3600)
    new_text, new = await api_key_store.rotate(old.key_id, overlap_s=1.0)
    verifier = ApiKeyVerifier(api_key_store, cache_s=0)
    assert (await verifier.verify(old_text)).id == old.key_id
    assert (await verifier.verify(new_text)).id == new.key_id
    assert (new.owner, new.scopes, new.plan) == (owner, old.scopes, old.plan)
    assert new.expires_at - new.created_at == pytest.approx(3600)
    assert (await api_key_store.get(old.key_id)).replaced_by == new.key_id

    await asyncio.sleep(1.1)
    assert (await _rejection(verifier, old_text)).reason == "expired"
    assert (await verifier.verify(new_text)).id == new.key_id
    with pytest.raises(ValueError):
        await api_key_store.rotate(old.key_id, overlap_s=0)


async def test_lifecycle_errors(api_key_store, redis_client):
    with pytest.raises(UnknownKey):
        await api_key_store.revoke("Z" * 12)
    for bad in ({"scopes": []}, {"scopes": ["has space"]}, {"plan": "no/slash"}, {"expires_in_s": 0}):
        arguments = {"owner": _owner(), "scopes": ["align"], "plan": "standard", **bad}
        with pytest.raises(ValueError):
            await api_key_store.create(**arguments)
    with pytest.raises(ValueError):
        ApiKeyStore(redis_client, b"short")


async def test_list_filters_by_owner(api_key_store):
    owner = _owner()
    created = [(await api_key_store.create(owner, ["align"], "standard"))[1] for _ in range(3)]
    await api_key_store.create(_owner(), ["align"], "standard")
    listed = await api_key_store.list(owner)
    assert [record.key_id for record in listed] == [record.key_id for record in created]
    assert {record.key_id for record in created} <= {record.key_id for record in await api_key_store.list()}


async def test_missing_scope_is_a_403_with_a_scope_challenge(api_key_store):
    text, _ = await api_key_store.create(_owner(), ["align"], "standard")
    authenticator = Authenticator(ApiKeyVerifier(api_key_store), jwt=None)
    principal = await authenticator.authenticate({"X-API-Key": text})
    authenticator.authorize(principal, "align")
    with pytest.raises(AuthFailure) as caught:
        authenticator.authorize(principal, "admin")
    failure = caught.value
    assert (failure.status, failure.error, failure.reason) == (403, "insufficient_scope", "insufficient-scope")
    challenge = www_authenticate(failure)
    assert 'error="insufficient_scope"' in challenge and 'scope="admin"' in challenge


async def test_redis_down_fails_closed_with_503(api_key_store, redis_server):
    text, _ = await api_key_store.create(_owner(), ["align"], "standard")
    verifier = ApiKeyVerifier(api_key_store)
    redis_server.stop()
    try:
        failure = await _rejection(verifier, text)
    finally:
        redis_server.start()
    assert (failure.status, failure.reason, failure.error) == (503, "store-unavailable", None)
    # The test Redis keeps nothing across a restart: a key created now shows verification is back.
    fresh_text, _ = await api_key_store.create(_owner(), ["align"], "standard")
    assert (await verifier.verify(fresh_text)).method == "api_key"


async def test_last_used_is_written_behind_not_per_request(redis_client, api_key_pepper):
    store = ApiKeyStore(redis_client, api_key_pepper, last_used_flush_s=1.0)
    text, record = await store.create(_owner(), ["align"], "standard")
    verifier = ApiKeyVerifier(store)
    writes_before = await command_calls(redis_client, "evalsha")
    for _ in range(20):
        await verifier.verify(text)
    assert await command_calls(redis_client, "evalsha") == writes_before
    assert (await store.get(record.key_id)).last_used_at is None

    await asyncio.sleep(1.05)
    await verifier.verify(text)  # due: starts one background flush
    await asyncio.sleep(0.1)
    assert await command_calls(redis_client, "evalsha") == writes_before + 1
    last_used_at = (await store.get(record.key_id)).last_used_at
    assert last_used_at is not None and last_used_at >= record.created_at
    assert store.last_used_stats.flushes == 1


# -- Redis outage: the stale copy (IngressOptions.api_key_stale_s) ----------------------------------


@pytest_asyncio.fixture
async def outage_store(private_redis_server, api_key_pepper):
    """A store on a Redis of the test's own, which the test may stop and start."""
    client = request_path_client(private_redis_server.url)
    yield ApiKeyStore(client, api_key_pepper)
    await client.aclose()


CACHE_S = 0.2  # short, so a test passes the fresh bound in a moment and the stale copy is what answers


async def test_recently_verified_key_keeps_working_from_its_stale_copy_while_redis_is_down(outage_store, private_redis_server):
    recent, record = await outage_store.create(_owner(), ["align"], "standard")
    never_seen, _ = await outage_store.create(_owner(), ["align"], "standard")
    verifier = ApiKeyVerifier(outage_store, cache_s=CACHE_S, stale_s=60)
    assert (await verifier.verify(recent)).stale_s is None  # fresh from Redis
    await asyncio.sleep(CACHE_S * 1.5)
    private_redis_server.stop()
    try:
        principal = await verifier.verify(recent)
        assert (principal.id, principal.scopes, principal.plan) == (record.key_id, record.scopes, record.plan)
        assert CACHE_S <= principal.stale_s < 60
        assert verifier.stale_serves == 1 and verifier.store_health.failures == 1
        # A stale copy still checks the secret: a wrong one is refused like any other time.
        wrong = format_api_key(record.key_id, "0" * 32)
        assert (await _rejection(verifier, wrong)).reason == "wrong-secret"
        failure = await _rejection(verifier, never_seen)
        assert (failure.status, failure.reason) == (503, "store-unavailable")
    finally:
        private_redis_server.start()
    assert (await verifier.verify(recent)).stale_s is None  # Redis answers: fresh again
    assert verifier.stale_serves == 1  # the wrong secret was not a serve


async def test_a_key_confirmed_longer_ago_than_the_stale_bound_fails_closed(outage_store, private_redis_server):
    text, _ = await outage_store.create(_owner(), ["align"], "standard")
    verifier = ApiKeyVerifier(outage_store, cache_s=CACHE_S, stale_s=1.0)
    await verifier.verify(text)
    await asyncio.sleep(CACHE_S * 1.5)
    private_redis_server.stop()
    try:
        assert (await verifier.verify(text)).stale_s is not None  # inside the bound
        await asyncio.sleep(1.05)
        failure = await _rejection(verifier, text)
    finally:
        private_redis_server.start()
    assert (failure.status, failure.reason) == (503, "store-unavailable")


async def test_a_revocation_the_replica_missed_applies_as_soon_as_redis_answers(outage_store, private_redis_server):
    text, record = await outage_store.create(_owner(), ["align"], "standard")
    verifier = ApiKeyVerifier(outage_store, cache_s=CACHE_S, stale_s=60)
    await verifier.verify(text)
    # Revoked after this replica's last look, then Redis becomes unreachable to it: the stale copy
    # cannot know, and keeps the key working for the outage (the documented price of availability).
    await outage_store.revoke(record.key_id)
    await asyncio.sleep(CACHE_S * 1.5)
    private_redis_server.stop()
    try:
        assert (await verifier.verify(text)).stale_s is not None
    finally:
        private_redis_server.start()
    failure = await _rejection(verifier, text)  # the first request after Redis is back
    assert (failure.status, failure.reason) == (401, "revoked")
    # And an outage right after that serves no stale "active" copy: the revoked record is the copy.
    private_redis_server.stop()
    try:
        assert (await _rejection(verifier, text)).reason == "revoked"
    finally:
        private_redis_server.start()


async def test_a_key_redis_says_does_not_exist_is_never_served_stale(outage_store, private_redis_server):
    text, record = await outage_store.create(_owner(), ["align"], "standard")
    verifier = ApiKeyVerifier(outage_store, cache_s=CACHE_S, stale_s=60)
    await verifier.verify(text)
    async with request_path_client(private_redis_server.url) as operator:
        await operator.delete(f"auth:apikey:{record.key_id}")  # as if restored from an older backup
    await asyncio.sleep(CACHE_S * 1.5)
    assert (await _rejection(verifier, text)).reason == "unknown-key"
    private_redis_server.stop()
    try:
        failure = await _rejection(verifier, text)
    finally:
        private_redis_server.start()
    assert (failure.status, failure.reason) == (503, "store-unavailable")


async def test_copies_older_than_both_bounds_are_pruned(outage_store, monkeypatch):
    monkeypatch.setattr(api_keys, "_PRUNE_INTERVAL_S", 0.0)
    verifier = ApiKeyVerifier(outage_store, cache_s=0.05, stale_s=0.1)
    for _ in range(3):
        await verifier.verify((await outage_store.create(_owner(), ["align"], "standard"))[0])
    assert verifier.cached_keys == 3
    await asyncio.sleep(0.15)
    await verifier.verify((await outage_store.create(_owner(), ["align"], "standard"))[0])
    assert verifier.cached_keys == 1


async def test_stale_copy_bound_defaults_to_ten_minutes():
    assert IngressOptions().api_key_stale_s == 600.0
    with pytest.raises(ValueError):
        IngressOptions(api_key_stale_s=-1)
