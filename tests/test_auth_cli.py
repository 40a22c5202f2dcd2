"""`python -m serve_app.cli keys|bans ...` as an operator runs it: a subprocess against the real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from serve_app.security.api_keys import ApiKeyVerifier, parse_api_key
from serve_app.security.authenticate import AuthFailure
from serve_app.security.abuse import AbuseMonitor
from serve_app.settings import AbuseOptions
from tests.support.cluster import ROOT


@pytest.fixture
def cli(redis_server, api_key_pepper):
    """Run `python -m serve_app.cli GROUP ARGS...` with only this session's Redis and pepper set."""

    def run(*arguments: str, pepper: bytes | None = api_key_pepper, group: str = "keys") -> subprocess.CompletedProcess:
        environment = {key: value for key, value in os.environ.items() if not key.startswith("ALIGNER_")}
        environment["ALIGNER_REDIS_URL"] = redis_server.url
        if pepper is not None:
            environment["ALIGNER_API_KEY_PEPPER"] = pepper.decode()
        return subprocess.run(
            [sys.executable, "-m", "serve_app.cli", group, *arguments],
            cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    return run


def _fields(stdout: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)


@pytest.mark.asyncio
async def test_key_lifecycle_through_the_cli(cli, api_key_store):
    owner = f"team-{uuid.uuid4().hex[:8]}"
    created = cli(
        "create", "--owner", owner, "--scope", "align", "--scope", "admin", "--plan", "premium", "--expires-in-days", "30"
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    fields = _fields(created.stdout)
    key, key_id = fields["api_key"], fields["key_id"]
    assert parse_api_key(key).key_id == key_id
    assert (fields["owner"], fields["scopes"], fields["plan"], fields["state"]) == (owner, "admin align", "premium", "active")
    assert "shown once" in created.stderr

    verifier = ApiKeyVerifier(api_key_store, cache_s=0)
    principal = await verifier.verify(key)
    assert (principal.id, principal.scopes, principal.plan) == (key_id, {"align", "admin"}, "premium")

    digest = (await api_key_store.get(key_id)).secret_digest
    secret = parse_api_key(key).secret
    for arguments in (("list", "--owner", owner), ("show", key_id)):
        shown = cli(*arguments)
        assert shown.returncode == 0 and key_id in shown.stdout
        assert secret not in shown.stdout + shown.stderr and digest not in shown.stdout + shown.stderr

    rotated = cli("rotate", key_id, "--overlap-hours", "1")
    assert rotated.returncode == 0, rotated.stderr
    new_key = _fields(rotated.stdout)["api_key"]
    assert (await verifier.verify(new_key)).id != key_id and (await verifier.verify(key)).id == key_id

    revoked = cli("revoke", key_id)
    assert revoked.returncode == 0 and _fields(revoked.stdout)["state"] == "revoked"
    with pytest.raises(AuthFailure) as caught:
        await verifier.verify(key)
    assert caught.value.reason == "revoked"


def test_unknown_key_missing_pepper_and_redis_down_have_distinct_exit_codes(cli, redis_server):
    assert cli("show", "Z" * 12).returncode == 1
    no_pepper = cli("list", pepper=None)
    assert no_pepper.returncode == 2 and "ALIGNER_API_KEY_PEPPER" in no_pepper.stderr
    refused = cli("create", "--owner", "x", "--scope", "align", "--expires-in-days", "0")
    assert refused.returncode == 1
    redis_server.stop()
    try:
        down = cli("list")
    finally:
        redis_server.start()
    assert down.returncode == 3 and redis_server.url not in down.stderr


@pytest.mark.asyncio
async def test_bans_are_listed_and_lifted_through_the_cli(cli, redis_client):
    monitor = AbuseMonitor(redis_client, AbuseOptions(allow_networks=[], max_malware_hits=1, ban_s=600))
    ip = f"198.51.100.{uuid.uuid4().int % 250 + 1}"
    [ban] = await monitor.record("malware", ip)
    listed = cli("list", group="bans")
    assert listed.returncode == 0 and ban.subject in listed.stdout and "reason=malware" in listed.stdout
    assert cli("lift", ban.subject, group="bans").returncode == 0
    assert await monitor.is_banned(ip) is None
    assert ban.subject not in cli("list", group="bans").stdout
    assert cli("lift", ban.subject, group="bans").returncode == 1  # nothing left to lift
