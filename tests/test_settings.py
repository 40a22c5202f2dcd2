"""Settings: cross-field validation, live versus start-only, and what reconfigure() really applies
(issue 10, point 14). Real Redis and clamd where a component needs them."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import BaseModel, ValidationError

from serve_app.settings import (
    AbuseOptions,
    AlignerOptions,
    IngressOptions,
    OAuthOptions,
    ScannerOptions,
    SheddingOptions,
)

# Read when a replica starts; every other user_config field is applied by reconfigure().
START_ONLY = {"IngressOptions.api_key_last_used_flush_s", "RateLimitOptions.redis_timeout_s"}


def _fields(model: type[BaseModel]):
    for name, field in model.model_fields.items():
        yield f"{model.__name__}.{name}", field
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            yield from _fields(nested)


@pytest.mark.parametrize("model", [IngressOptions, ScannerOptions, AlignerOptions])
def test_start_only_settings_say_so_and_no_other_does(model):
    marked = {name for name, field in _fields(model) if (field.description or "").startswith("Start-only")}
    assert marked == {name for name, _ in _fields(model) if name in START_ONLY}


def test_operations_doc_lists_every_start_only_setting():
    from tests.support.cluster import ROOT

    text = (ROOT / "docs" / "operations.md").read_text()
    for name in START_ONLY:
        assert f"{name.rsplit('.', 1)[1]}`" in text, name


@pytest.mark.parametrize(
    ("model", "values", "complaint"),
    [
        (SheddingOptions, {"reduce_above": 1.0}, "less than 1"),  # divided by (1 - reduce_above)
        (SheddingOptions, {"shed_above": 2.0, "shed_top_priority_above": 1.5}, "shed_top_priority_above"),
        (SheddingOptions, {"max_sample_age_s": 1.0, "sample_interval_s": 2.0}, "sample_interval_s"),
        (OAuthOptions, {"jwks_min_cache_s": 600, "jwks_max_cache_s": 60}, "jwks_max_cache_s"),
        (AbuseOptions, {"ban_s": 7200, "max_ban_s": 3600}, "max_ban_s"),
    ],
)
def test_settings_that_contradict_each_other_fail_validation(model, values, complaint):
    with pytest.raises(ValidationError, match=complaint):
        model(**values)


def test_reduce_above_just_below_one_gives_a_finite_load_factor():
    from serve_app.security.shedding import LoadSample, LoadShedder

    shedder = LoadShedder(SheddingOptions(reduce_above=0.99))
    shedder.update(LoadSample(10, 0, 10, 0.0, 0, 4))
    assert shedder.load_factor == pytest.approx(0.25)


def test_the_config_lint_refuses_a_scanner_that_cannot_fill_its_scan_slots():
    from serve_app.config_lint import _lint_deployment

    scanner = {"max_ongoing_requests": 2, "max_queued_requests": 8, "ray_actor_options": {"num_cpus": 0.25}, "user_config": {"max_concurrent_scans": 4}}
    assert any("max_concurrent_scans" in problem for problem in _lint_deployment("Scanner", scanner))
    scanner["max_ongoing_requests"] = 4
    assert _lint_deployment("Scanner", scanner) == []


# -- what reconfigure() applies -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_api_key_cache_time_applies_live_without_an_oauth_change(redis_server, api_key_store, api_key_pepper):
    """It used to change only when the `oauth` block changed: a revoked key kept working for the old
    cache time however the operator had lowered it."""
    from serve_app.api.gate import Gate
    from serve_app.security.api_keys import parse_api_key
    from serve_app.security.audit import AuditLog
    from serve_app.security.authenticate import AuthFailure
    from serve_app.settings import Environment
    from tests.support.secrets_seen import remember

    key = remember((await api_key_store.create("settings-test", ["align"], "standard", None))[0])
    environment = Environment.from_env({"ALIGNER_REDIS_URL": redis_server.url, "ALIGNER_API_KEY_PEPPER": api_key_pepper.decode()})
    gate = Gate(environment, IngressOptions(api_key_cache_s=60), AuditLog.from_destination("stdout"))
    try:
        headers = {"authorization": f"Bearer {key}"}
        assert (await gate.authenticator.authenticate(headers)).method == "api_key"  # now cached for 60 s
        gate.reconfigure(IngressOptions(api_key_cache_s=0))  # the oauth block is unchanged
        await api_key_store.revoke(parse_api_key(key).key_id)
        with pytest.raises(AuthFailure):
            await gate.authenticator.authenticate(headers)
    finally:
        await gate.close()


@pytest.mark.asyncio
async def test_retry_after_applies_live_to_the_rate_limiters_own_503(private_redis_server):
    """It was read once at start: the limiter's fail-closed 503 kept the old Retry-After."""
    from serve_app.security.ratelimit import RateLimiter, TokenBucketLimiter
    from serve_app.security.redis_store import request_path_client
    from serve_app.settings import RateLimitOptions

    redis = request_path_client(private_redis_server.url)
    try:
        limiter = RateLimiter(TokenBucketLimiter(redis), RateLimitOptions(fail_open=False), unavailable_retry_after_s=5)
        limiter.reconfigure(RateLimitOptions(fail_open=False), unavailable_retry_after_s=17)
        private_redis_server.stop()
        decision = await limiter.take_pre_auth("203.0.113.9")
        assert decision.store_error and not decision.allowed and decision.retry_after_s == 17
    finally:
        await redis.aclose()


# -- a cancelled scan keeps its slot ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_cancelled_scan_keeps_its_slot_until_its_decode_thread_ends(clamd_server, monkeypatch, tmp_path):
    from deployments.scanner import Scanner
    from serve_app.media import Spool
    from tests.support.audio import silence_flac

    monkeypatch.setenv("ALIGNER_CLAMD_ADDRESS", f"unix://{clamd_server.socket_path}")
    monkeypatch.setenv("ALIGNER_SPOOL_DIR", str(tmp_path / "spool"))
    scanner = Scanner.func_or_class()
    wall_s = 1.5
    # Caps raised so that only the wall-time cap stops this hour of 192 kHz 7.1 silence.
    scanner.reconfigure(
        ScannerOptions(max_concurrent_scans=1, max_decode_wall_seconds=wall_s, max_decoded_seconds=1e6, max_source_samples=10**13).model_dump()
    )
    with Spool(tmp_path / "spool").writer("upload") as writer:
        writer.write(silence_flac(3600.0, 192_000, 8, declare_length=False))
        bomb = writer.commit()
    try:
        caller = asyncio.create_task(scanner.inspect(bomb, 1e6))
        await asyncio.sleep(0.3)  # clamd has answered; the decode runs in its thread
        caller.cancel()  # what the ingress's scan timeout does
        with pytest.raises(asyncio.CancelledError):
            await caller
        cancelled_at = time.monotonic()
        assert scanner._slots.locked() and (await scanner.load())["scanner_backlog"] == 1
        while scanner._slots.locked():
            await asyncio.sleep(0.05)
        assert time.monotonic() - cancelled_at > 0.3  # held until the thread really ended
        assert (await scanner.load())["scanner_backlog"] == 0
    finally:
        scanner._probe.cancel()
