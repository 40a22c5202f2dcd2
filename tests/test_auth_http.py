"""Authentication and authorization through the real Serve graph (issue 3), over HTTP.

Against the session's real Redis (API keys, bans) and its real loopback OAuth2 issuer
(tests/support/issuer.py, trusted by both apps). Cache-sensitive tests use the "qwen3" app: it has
one ingress replica, so one API key cache; the "aligner" app's two replicas have one each.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid

import pytest
from authlib.integrations.httpx_client import OAuth2Client

from serve_app.security.api_keys import parse_api_key
from serve_app.settings import IngressOptions
from tests.conftest import OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, OAUTH_NO_ALIGN_CLIENT_ID, PEPPER, create_api_key
from tests.support import keys
from tests.support.gate_http import PASSED_GATE, bearer, challenge, gate_probe, poll, retry_after_s, session
from tests.support.hostile import tone_wav
from tests.support.keys import mistyped
from tests.support.secrets_seen import remember
from tests.test_api import assert_problem, eval_clip, post_align

QWEN3 = "/qwen3"
API_KEY_CACHE_S = IngressOptions().api_key_cache_s  # the bound on how long a revoked key keeps working
SLACK_S = 3.0  # request latency on a loaded 2-core box
ROTATION_OVERLAP_S = 6.0


def _owner() -> str:
    return f"http-test-{uuid.uuid4().hex[:8]}"


# -- credentials: where they may be, and what a bad one gets ---------------------------------------


def test_no_credential_is_a_401_challenge_without_an_error(anonymous):
    response = gate_probe(anonymous)
    assert_problem(response, 401, "unauthenticated")
    assert challenge(response) == {"realm": "forced-aligner"}  # RFC 6750 §3.1: no error when nothing was sent


def test_key_with_a_bad_checksum_is_an_invalid_token(anonymous, align_key):
    response = gate_probe(anonymous, headers=bearer(mistyped(align_key)))
    assert_problem(response, 401, "unauthenticated")
    assert challenge(response)["error"] == "invalid_token"


@pytest.mark.parametrize("parameter", ["api_key", "access_token"])
def test_credentials_in_the_query_string_are_ignored(anonymous, align_key, parameter):
    response = anonymous.post(
        "/v1/align", params={parameter: align_key}, content=b"x", headers={"Content-Type": "text/plain"}
    )
    assert_problem(response, 401, "unauthenticated")
    assert "error" not in challenge(response)  # read as "no credential at all"


def test_two_different_credentials_are_refused(anonymous, align_key, admin_key):
    response = gate_probe(anonymous, headers={**bearer(align_key), "X-API-Key": admin_key})
    assert_problem(response, 400, "invalid-request")
    assert challenge(response)["error"] == "invalid_request"
    same = gate_probe(anonymous, headers={**bearer(align_key), "X-API-Key": align_key})
    assert same.status_code == PASSED_GATE, same.text


def test_align_only_key_cannot_use_admin_routes(client):
    response = client.get("/v1/admin/keys")
    assert_problem(response, 403, "insufficient-scope")
    parameters = challenge(response)
    assert (parameters["error"], parameters["scope"]) == ("insufficient_scope", "admin")


# -- the admin API over HTTP -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin(serve_url, admin_key):
    with session(serve_url, admin_key) as admin_session:
        yield admin_session


def _create_key(admin, owner: str, plan: str = "unlimited"):
    return admin.post(f"{QWEN3}/v1/admin/keys", json={"owner": owner, "scopes": ["align"], "plan": plan})


def test_created_key_is_shown_once_and_works(admin, serve_url):
    owner = _owner()
    created = _create_key(admin, owner)
    assert created.status_code == 201, created.text
    key, record = remember(created.json()["key"]), created.json()["record"]
    parsed = parse_api_key(key)
    assert parsed is not None and parsed.key_id == record["key_id"]
    assert (record["owner"], record["scopes"], record["plan"], record["state"]) == (owner, ["align"], "unlimited", "active")

    digest = hmac.new(PEPPER, parsed.secret.encode(), hashlib.sha256).hexdigest()
    listing = admin.get(f"{QWEN3}/v1/admin/keys", params={"owner": owner})
    shown = admin.get(f"{QWEN3}/v1/admin/keys/{record['key_id']}")
    assert [entry["key_id"] for entry in listing.json()] == [record["key_id"]]
    assert shown.json()["key_id"] == record["key_id"]
    for response in (listing, shown):
        assert response.status_code == 200, response.text
        assert parsed.secret not in response.text and digest not in response.text
        assert "digest" not in response.text and '"key"' not in response.text

    with session(serve_url, key) as as_new_key:
        response = post_align(as_new_key, tone_wav(), "hello", prefix=QWEN3)
    assert response.status_code == 200, response.text


def test_revoked_key_is_refused_within_the_cache_bound(admin, anonymous):
    created = _create_key(admin, _owner()).json()
    key, key_id = remember(created["key"]), created["record"]["key_id"]
    assert gate_probe(anonymous, QWEN3, bearer(key)).status_code == PASSED_GATE  # now in the ingress's cache

    revoked = admin.post(f"{QWEN3}/v1/admin/keys/{key_id}/revoke")
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked", revoked.text
    response, elapsed_s = poll(
        lambda: gate_probe(anonymous, QWEN3, bearer(key)), lambda r: r.status_code == 401, API_KEY_CACHE_S + SLACK_S
    )
    assert_problem(response, 401, "unauthenticated")
    assert challenge(response)["error"] == "invalid_token"
    assert elapsed_s <= API_KEY_CACHE_S + SLACK_S


def test_rotation_keeps_both_keys_live_for_the_overlap_only(admin, anonymous):
    old = _create_key(admin, _owner()).json()
    old_id = old["record"]["key_id"]
    rotated = admin.post(f"{QWEN3}/v1/admin/keys/{old_id}/rotate", json={"overlap_hours": ROTATION_OVERLAP_S / 3600})
    rotated_at = time.monotonic()
    assert rotated.status_code == 201, rotated.text  # a new key: created, like POST /v1/admin/keys
    new = rotated.json()
    remember(old["key"]), remember(new["key"])
    assert new["record"]["key_id"] != old_id
    # The old key was never used before the rotation, so no cached record outlives the overlap.
    assert gate_probe(anonymous, QWEN3, bearer(new["key"])).status_code == PASSED_GATE
    assert gate_probe(anonymous, QWEN3, bearer(old["key"])).status_code == PASSED_GATE

    response, _ = poll(
        lambda: gate_probe(anonymous, QWEN3, bearer(old["key"])), lambda r: r.status_code == 401, ROTATION_OVERLAP_S + SLACK_S
    )
    stopped_after_s = time.monotonic() - rotated_at
    assert_problem(response, 401, "unauthenticated")
    assert ROTATION_OVERLAP_S - 1 <= stopped_after_s <= ROTATION_OVERLAP_S + SLACK_S
    assert gate_probe(anonymous, QWEN3, bearer(new["key"])).status_code == PASSED_GATE
    shown = admin.get(f"{QWEN3}/v1/admin/keys/{old_id}").json()
    assert (shown["state"], shown["replaced_by"]) == ("expired", new["record"]["key_id"])


def test_unknown_plan_is_refused(admin):
    response = _create_key(admin, _owner(), plan="no-such-plan")
    assert "plan" in assert_problem(response, 400, "invalid-request")["detail"]


# -- OAuth2 access tokens from the loopback issuer -------------------------------------------------


def _client_credentials_token(oauth_issuer, client_id: str, scope: str) -> str:
    with OAuth2Client(client_id, OAUTH_CLIENT_SECRET, token_endpoint_auth_method="client_secret_basic") as oauth:
        return remember(oauth.fetch_token(oauth_issuer.token_endpoint, grant_type="client_credentials", scope=scope)["access_token"])


def test_client_credentials_token_aligns(serve_url, oauth_issuer, eval_utterances):
    token = _client_credentials_token(oauth_issuer, OAUTH_CLIENT_ID, "align")
    utterance = eval_utterances[0]
    with session(serve_url, token) as as_client:
        response = post_align(as_client, eval_clip(utterance), utterance["transcript"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert [word["text"] for word in body["words"]] == utterance["transcript"].split()
    assert body["words"][-1]["end"] > body["words"][0]["start"]


def test_token_without_the_align_scope_is_forbidden(anonymous, oauth_issuer):
    token = _client_credentials_token(oauth_issuer, OAUTH_NO_ALIGN_CLIENT_ID, "reports")
    response = gate_probe(anonymous, headers=bearer(token))
    assert_problem(response, 403, "insufficient-scope")
    assert challenge(response)["scope"] == "align"


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"iat": int(time.time()) - 3600, "exp": int(time.time()) - 600}, id="expired"),
        pytest.param({"aud": "https://other.example/api"}, id="wrong-audience"),
        pytest.param({"scope": ["align"]}, id="scope-as-json-array"),  # RFC 9068: a space-separated string
    ],
)
def test_expired_or_foreign_token_is_an_invalid_token(anonymous, oauth_issuer, overrides):
    # Signed with the issuer's published key: only the claims are wrong.
    token = remember(oauth_issuer.mint(oauth_issuer.access_token_claims(OAUTH_CLIENT_ID, "align", **overrides)))
    response = gate_probe(anonymous, headers=bearer(token))
    assert_problem(response, 401, "unauthenticated")
    assert challenge(response)["error"] == "invalid_token"


# -- Redis down: recently confirmed keys keep working from the stale copy, others fail closed -------


def test_redis_outage_serves_recent_keys_from_the_stale_copy_and_refuses_unseen_ones(serve_url, redis_server):
    recent_key = create_api_key(redis_server, _owner(), ["align"], "unlimited")
    unseen_key = create_api_key(redis_server, _owner(), ["align"], "unlimited")
    missed_revocation_key = create_api_key(redis_server, _owner(), ["align"], "unlimited")
    with session(serve_url, recent_key) as recent, session(serve_url, unseen_key) as unseen, session(serve_url, missed_revocation_key) as missed:
        assert gate_probe(recent, QWEN3).status_code == PASSED_GATE
        assert gate_probe(missed, QWEN3).status_code == PASSED_GATE
        # Revoked, then Redis goes away before the replica looks again (its cache is fresh).
        keys.revoke_api_key(redis_server.url, PEPPER, parse_api_key(missed_revocation_key).key_id)
        redis_server.stop()
        stopped_at = time.monotonic()
        try:
            time.sleep(API_KEY_CACHE_S + 0.5)  # past the fresh bound: only the stale copy can answer
            served = post_align(recent, tone_wav(), "hello", prefix=QWEN3)
            assert served.status_code == 200, served.text
            assert "ratelimit-policy" not in served.headers  # no bucket state known: Redis was not read
            assert gate_probe(missed, QWEN3).status_code == PASSED_GATE  # the documented price

            refused = gate_probe(unseen, QWEN3)
            assert_problem(refused, 503, "service-unavailable")
            retry_after_s(refused)
            assert time.monotonic() - stopped_at < IngressOptions().api_key_stale_s
        finally:
            redis_server.start()

        # Nothing of ours restarts: the replica's Redis client reconnects, and Redis's answers win.
        for caller in (recent, unseen):
            response, _ = poll(lambda: post_align(caller, tone_wav(), "hello", prefix=QWEN3), lambda r: r.status_code == 200, 20)
            assert response.status_code == 200, response.text
            assert "ratelimit-policy" in response.headers
        revoked, _ = poll(lambda: gate_probe(missed, QWEN3), lambda r: r.status_code == 401, 20)
        assert_problem(revoked, 401, "unauthenticated")
