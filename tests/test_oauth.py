"""OAuth2 access tokens against real loopback issuers (tests/support/issuer.py): the attack list of
issue 3, JWKS caching and refetch limits, issuer outages, and RFC 7662 introspection.

Legitimate tokens come from the issuer's token endpoint through authlib's OAuth2 client
(client_credentials, client_secret_basic); attack tokens are minted directly.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
import pytest_asyncio
from authlib.integrations.httpx_client import AsyncOAuth2Client

from serve_app.security.authenticate import AuthFailure
from serve_app.security.jwks import cache_lifetime, discovery_urls
from serve_app.security.oauth import JwtVerifier
from serve_app.security.ratelimit import RateLimiter, TokenBucketLimiter, principal_key
from serve_app.settings import OAuthIssuer, OAuthOptions, Plan, RateLimitOptions
from tests.support.issuer import AUDIENCE, LoopbackIssuer, hs256_with_public_key, new_rsa_key, unsigned_token

pytestmark = pytest.mark.asyncio

CLIENT_ID, CLIENT_SECRET = "batch-worker", "batch-worker-secret"
PREMIUM_CLIENT_ID = "premium-worker"
OPAQUE_CLIENT_ID = "legacy-worker"
RESOURCE_SERVER_ID, RESOURCE_SERVER_SECRET = "aligner-api", "aligner-api-secret"
LEEWAY_S = 30


@pytest.fixture(scope="module")
def issuer():
    server = LoopbackIssuer().start()
    server.register_client(CLIENT_ID, CLIENT_SECRET, ("align",))
    server.register_client(PREMIUM_CLIENT_ID, CLIENT_SECRET, ("align", "admin"))
    server.register_client(OPAQUE_CLIENT_ID, CLIENT_SECRET, ("align",), opaque=True)
    server.register_client(RESOURCE_SERVER_ID, RESOURCE_SERVER_SECRET, ())
    yield server
    server.stop()


@pytest.fixture(scope="module")
def second_issuer():
    """Another trusted issuer, discoverable through OIDC metadata only."""
    server = LoopbackIssuer(metadata_documents=("openid-configuration",)).start()
    server.register_client(CLIENT_ID, CLIENT_SECRET, ("align",))
    yield server
    server.stop()


@pytest_asyncio.fixture
async def http():
    async with httpx.AsyncClient() as client:
        yield client


def _issuer_config(server: LoopbackIssuer, **overrides) -> OAuthIssuer:
    return OAuthIssuer(issuer=server.issuer, audience=AUDIENCE, **overrides)


def _introspecting_config(server: LoopbackIssuer) -> OAuthIssuer:
    return _issuer_config(
        server, introspection_endpoint=server.introspection_endpoint, introspection_client_id=RESOURCE_SERVER_ID
    )


def _verifier(http: httpx.AsyncClient, *issuers: OAuthIssuer, secret: str | None = None, **options) -> JwtVerifier:
    return JwtVerifier(OAuthOptions(issuers=list(issuers), leeway_s=LEEWAY_S, **options), http, secret)


async def _fetch_token(server: LoopbackIssuer, client_id: str = CLIENT_ID, scope: str = "align") -> str:
    async with AsyncOAuth2Client(client_id, CLIENT_SECRET, token_endpoint_auth_method="client_secret_basic") as client:
        token = await client.fetch_token(server.token_endpoint, grant_type="client_credentials", scope=scope)
    return token["access_token"]


async def _rejection(verifier: JwtVerifier, token: str) -> AuthFailure:
    with pytest.raises(AuthFailure) as caught:
        await verifier.verify(token)
    assert caught.value.method == "jwt"
    return caught.value


# --- the legitimate path -------------------------------------------------------------------
async def test_token_from_the_issuer_gives_its_principal(issuer, http):
    verifier = _verifier(http, _issuer_config(issuer, plan_by_client={PREMIUM_CLIENT_ID: "premium"}))
    principal = await verifier.verify(await _fetch_token(issuer))
    assert (principal.method, principal.id, principal.scopes, principal.plan) == ("jwt", CLIENT_ID, {"align"}, "standard")
    premium = await verifier.verify(await _fetch_token(issuer, PREMIUM_CLIENT_ID, "align admin"))
    assert (premium.id, premium.scopes, premium.plan) == (PREMIUM_CLIENT_ID, {"align", "admin"}, "premium")
    assert verifier.jwks_stats[issuer.issuer].fetches == 1  # cached across tokens


async def test_scp_claim_and_sub_only_tokens(issuer, http):
    verifier = _verifier(http, _issuer_config(issuer))
    token = issuer.mint(issuer.access_token_claims(CLIENT_ID, "", scope=None, client_id=None, scp=["align"]))
    principal = await verifier.verify(token)
    assert (principal.id, principal.scopes) == (CLIENT_ID, {"align"})


async def test_scope_claim_as_a_json_array_is_refused(issuer, http):
    # RFC 9068 (via RFC 8693 §4.2) defines `scope` as one space-separated string.
    verifier = _verifier(http, _issuer_config(issuer))
    failure = await _rejection(verifier, issuer.mint(issuer.access_token_claims(CLIENT_ID, "", scope=["align"])))
    assert (failure.status, failure.error, failure.reason) == (401, "invalid_token", "invalid-claim")
    assert "scope" in failure.description


async def test_same_client_id_at_two_issuers_is_two_principals_with_their_own_buckets(issuer, second_issuer, http, redis_client):
    verifier = _verifier(http, _issuer_config(issuer), _issuer_config(second_issuer))
    first = await verifier.verify(await _fetch_token(issuer))
    second = await verifier.verify(await _fetch_token(second_issuer))
    assert first.id == second.id == CLIENT_ID
    assert (first.issuer, second.issuer) == (issuer.issuer, second_issuer.issuer)
    assert principal_key(first) != principal_key(second)
    # Both issuers are this module's own (new ports each run): no other test takes from these buckets.
    limiter = RateLimiter(TokenBucketLimiter(redis_client), RateLimitOptions())
    plan = Plan(requests_burst=2, requests_per_minute=0.001)
    assert [(await limiter.take_request(first, plan)).allowed for _ in range(3)] == [True, True, False]
    assert (await limiter.take_request(second, plan)).allowed


# --- attacks -------------------------------------------------------------------------------
async def test_alg_none_is_rejected(issuer, http):
    verifier = _verifier(http, _issuer_config(issuer))
    token = unsigned_token(issuer.access_token_claims(CLIENT_ID, "align"), kid=issuer.current_key.kid)
    assert (await _rejection(verifier, token)).reason == "alg-not-allowed"


async def test_hs256_signed_with_the_public_key_is_rejected(issuer, http):
    verifier = _verifier(http, _issuer_config(issuer))
    token = hs256_with_public_key(issuer.access_token_claims(CLIENT_ID, "align"), issuer.current_key)
    assert (await _rejection(verifier, token)).reason == "alg-not-allowed"


async def test_wrong_audience_is_rejected(issuer, http):
    verifier = _verifier(http, _issuer_config(issuer))
    token = issuer.mint(issuer.access_token_claims(CLIENT_ID, "align", aud=["https://other.example/api"]))
    failure = await _rejection(verifier, token)
    assert (failure.status, failure.error, failure.reason) == (401, "invalid_token", "wrong-audience")


async def test_untrusted_issuer_is_rejected(issuer, http):
    verifier = _verifier(http, _issuer_config(issuer))
    token = issuer.mint(issuer.access_token_claims(CLIENT_ID, "align", iss="https://attacker.example"))
    assert (await _rejection(verifier, token)).reason == "wrong-issuer"
    assert verifier.jwks_stats[issuer.issuer].fetches == 0  # rejected before any key lookup


async def test_expired_token_is_rejected(issuer, http):
    verifier = _verifier(http, _issuer_config(issuer))
    past = int(time.time()) - LEEWAY_S - 60
    token = issuer.mint(issuer.access_token_claims(CLIENT_ID, "align", iat=past - 300, exp=past))
    assert (await _rejection(verifier, token)).reason == "expired"


async def test_token_not_yet_valid_is_rejected(issuer, http):
    verifier = _verifier(http, _issuer_config(issuer))
    future = int(time.time()) + LEEWAY_S + 60
    token = issuer.mint(issuer.access_token_claims(CLIENT_ID, "align", nbf=future))
    assert (await _rejection(verifier, token)).reason == "not-yet-valid"


async def test_token_without_client_id_or_sub_is_rejected(issuer, http):
    verifier = _verifier(http, _issuer_config(issuer))
    token = issuer.mint(issuer.access_token_claims(CLIENT_ID, "align", sub=None, client_id=None))
    assert (await _rejection(verifier, token)).reason == "missing-claim"


@pytest.mark.parametrize("typ", [None, "JWT"])
async def test_token_without_at_jwt_typ_is_rejected_unless_switched_off(issuer, http, typ):
    token = issuer.mint(issuer.access_token_claims(CLIENT_ID, "align"), typ=typ)
    strict = _verifier(http, _issuer_config(issuer))
    assert (await _rejection(strict, token)).reason == "bad-typ"
    lenient = _verifier(http, _issuer_config(issuer, require_at_jwt_typ=False))
    assert (await lenient.verify(token)).id == CLIENT_ID
    media_type_form = issuer.mint(issuer.access_token_claims(CLIENT_ID, "align"), typ="application/AT+JWT")
    assert (await strict.verify(media_type_form)).id == CLIENT_ID


async def test_unknown_kid_signed_by_an_attacker_key_is_rejected(issuer, http):
    verifier = _verifier(http, _issuer_config(issuer), jwks_refetch_interval_s=0)
    token = issuer.mint(issuer.access_token_claims(CLIENT_ID, "align"), key=new_rsa_key())
    assert (await _rejection(verifier, token)).reason == "unknown-kid"


async def test_attacker_key_reusing_a_known_kid_is_rejected(issuer, http):
    verifier = _verifier(http, _issuer_config(issuer))
    token = issuer.mint(issuer.access_token_claims(CLIENT_ID, "align"), key=new_rsa_key(), kid=issuer.current_key.kid)
    assert (await _rejection(verifier, token)).reason == "bad-signature"


async def test_second_trusted_issuer_is_accepted_with_its_own_keys_only(issuer, second_issuer, http):
    verifier = _verifier(http, _issuer_config(issuer), _issuer_config(second_issuer))
    assert (await verifier.verify(await _fetch_token(second_issuer))).id == CLIENT_ID
    assert second_issuer.hits["/.well-known/openid-configuration"] >= 1  # OIDC discovery fallback
    assert (await verifier.verify(await _fetch_token(issuer))).id == CLIENT_ID
    # Signed by the first issuer but claiming to come from the second: the second's keys decide.
    forged = issuer.mint(issuer.access_token_claims(CLIENT_ID, "align", iss=second_issuer.issuer))
    assert (await _rejection(verifier, forged)).reason in ("unknown-kid", "bad-signature")


# --- keys, caching, outages ----------------------------------------------------------------
async def test_key_rotation_at_the_issuer_is_picked_up(issuer, http):
    verifier = _verifier(http, _issuer_config(issuer), jwks_refetch_interval_s=0)
    await verifier.verify(await _fetch_token(issuer))
    old_token = issuer.mint(issuer.access_token_claims(CLIENT_ID, "align"))
    issuer.rotate_key()
    jwks_hits = issuer.hits["/jwks"]
    assert (await verifier.verify(await _fetch_token(issuer))).id == CLIENT_ID  # new kid: one refetch
    assert issuer.hits["/jwks"] == jwks_hits + 1
    assert (await verifier.verify(old_token)).id == CLIENT_ID  # the old key is still published


async def test_unknown_kid_flood_costs_at_most_one_jwks_fetch_per_interval(issuer, http):
    interval_s = 1.0
    verifier = _verifier(http, _issuer_config(issuer), jwks_refetch_interval_s=interval_s)
    await verifier.verify(await _fetch_token(issuer))
    attacker_key = new_rsa_key()
    claims = issuer.access_token_claims(CLIENT_ID, "align")
    flood = [issuer.mint(dict(claims), key=attacker_key, kid=uuid.uuid4().hex) for _ in range(50)]

    await asyncio.sleep(interval_s)
    jwks_hits = issuer.hits["/jwks"]
    # A concurrent burst shares one refetch; what follows within the interval gets none.
    burst = await asyncio.gather(*(_rejection(verifier, token) for token in flood[:30]))
    after = [await _rejection(verifier, token) for token in flood[30:]]
    assert {failure.reason for failure in burst + after} == {"unknown-kid"}
    assert issuer.hits["/jwks"] == jwks_hits + 1
    stats = verifier.jwks_stats[issuer.issuer]
    assert (stats.fetches, stats.refetches_suppressed) == (2, 20)


async def test_issuer_down_with_warm_cache_keeps_verifying_and_counts_the_failure(issuer, http):
    # A cache lifetime of 0.1 s makes the keys stale at once, so a refresh is attempted (and fails).
    verifier = _verifier(http, _issuer_config(issuer), jwks_min_cache_s=0, jwks_max_cache_s=0.1, jwks_refetch_interval_s=0)
    token = await _fetch_token(issuer)
    await verifier.verify(token)
    issuer.stop()
    try:
        await asyncio.sleep(0.15)
        assert (await verifier.verify(token)).id == CLIENT_ID
        await asyncio.sleep(0.1)  # let the background refresh fail
        assert (await verifier.verify(token)).id == CLIENT_ID
    finally:
        issuer.start()
    stats = verifier.jwks_stats[issuer.issuer]
    assert stats.fetch_failures >= 1 and stats.stale_uses >= 2


async def test_issuer_down_with_cold_cache_is_a_503(issuer, http):
    token = await _fetch_token(issuer)
    verifier = _verifier(http, _issuer_config(issuer))
    issuer.stop()
    try:
        failure = await _rejection(verifier, token)
        again = await _rejection(verifier, token)  # within the refetch interval: no new attempt
    finally:
        issuer.start()
    assert (failure.status, failure.error, failure.reason) == (503, None, "issuer-unavailable")
    assert again.reason == "issuer-unavailable"
    assert verifier.jwks_stats[issuer.issuer].fetch_failures == 1


async def test_cache_control_max_age_is_clamped():
    assert cache_lifetime("public, max-age=300", 60, 3600) == 300
    assert cache_lifetime("max-age=5", 60, 3600) == 60
    assert cache_lifetime("max-age=86400", 60, 3600) == 3600
    assert cache_lifetime("no-store", 60, 3600) == 60
    assert cache_lifetime(None, 60, 3600) == 60


async def test_discovery_urls_follow_rfc8414_then_oidc():
    assert discovery_urls("https://idp.example/tenant1") == [
        "https://idp.example/.well-known/oauth-authorization-server/tenant1",
        "https://idp.example/tenant1/.well-known/openid-configuration",
    ]


async def test_plain_http_issuer_off_loopback_is_refused(http):
    with pytest.raises(ValueError):
        _verifier(http, OAuthIssuer(issuer="http://idp.example", audience=AUDIENCE))


# --- opaque tokens -------------------------------------------------------------------------
async def test_opaque_token_is_introspected_and_cached(issuer, http):
    config = _introspecting_config(issuer)
    verifier = _verifier(http, config, secret=RESOURCE_SERVER_SECRET)
    token = await _fetch_token(issuer, OPAQUE_CLIENT_ID)
    assert "." not in token
    introspections = issuer.hits["/introspect"]
    for _ in range(3):
        principal = await verifier.verify(token)
    assert (principal.id, principal.scopes) == (OPAQUE_CLIENT_ID, {"align"})
    assert issuer.hits["/introspect"] == introspections + 1

    issuer.revoke_opaque(token)
    fresh_verifier = _verifier(http, config, secret=RESOURCE_SERVER_SECRET)
    assert (await _rejection(fresh_verifier, token)).reason == "inactive"


async def test_introspection_with_wrong_client_credentials_is_a_503(issuer, http):
    verifier = _verifier(http, _introspecting_config(issuer), secret="not-the-secret")
    failure = await _rejection(verifier, await _fetch_token(issuer, OPAQUE_CLIENT_ID))
    assert (failure.status, failure.reason) == (503, "issuer-unavailable")
