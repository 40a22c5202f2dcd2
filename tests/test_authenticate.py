"""The Authenticator: where credentials may come from, how they are routed, what the client is told."""

from __future__ import annotations

import pickle
import uuid

import httpx
import pytest
import pytest_asyncio
from starlette.datastructures import Headers

from serve_app.security.api_keys import ApiKeyVerifier
from serve_app.security.authenticate import Authenticator, AuthFailure, www_authenticate
from serve_app.security.oauth import JwtVerifier
from serve_app.settings import OAuthIssuer, OAuthOptions
from tests.support.issuer import AUDIENCE, LoopbackIssuer
from tests.support.keys import mistyped

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def issuer():
    server = LoopbackIssuer().start()
    yield server
    server.stop()


@pytest_asyncio.fixture
async def authenticator(api_key_store, issuer):
    async with httpx.AsyncClient() as http:
        jwt = JwtVerifier(OAuthOptions(issuers=[OAuthIssuer(issuer=issuer.issuer, audience=AUDIENCE)]), http)
        yield Authenticator(ApiKeyVerifier(api_key_store), jwt)


@pytest_asyncio.fixture
async def api_key(api_key_store) -> str:
    text, _ = await api_key_store.create(f"team-{uuid.uuid4().hex[:8]}", ["align"], "standard")
    return text


async def _failure(authenticator: Authenticator, headers) -> AuthFailure:
    with pytest.raises(AuthFailure) as caught:
        await authenticator.authenticate(headers)
    return caught.value


async def test_api_key_is_accepted_from_either_header(authenticator, api_key):
    both_agreeing = {"X-Api-Key": api_key, "authorization": f"bearer {api_key}"}
    for headers in ({"Authorization": f"Bearer {api_key}"}, {"x-api-key": api_key}, both_agreeing):
        assert (await authenticator.authenticate(headers)).method == "api_key"


async def test_bearer_jwt_goes_to_the_jwt_verifier(authenticator, issuer):
    token = issuer.mint(issuer.access_token_claims("worker", "align"))
    principal = await authenticator.authenticate(Headers({"authorization": f"Bearer {token}"}))
    assert (principal.method, principal.id) == ("jwt", "worker")


async def test_mistyped_api_key_in_bearer_gets_the_api_key_answer(authenticator, api_key):
    failure = await _failure(authenticator, {"Authorization": f"Bearer {mistyped(api_key)}"})
    assert (failure.method, failure.reason) == ("api_key", "bad-checksum")


async def test_a_mistyped_key_always_differs_from_the_key():
    for key in ("fa_abc_x", "fa_abc_A", "fa_abc_B", "fa_abc_0"):
        assert mistyped(key) != key and mistyped(key)[:-1] == key[:-1]


async def test_no_credential_is_a_401_without_error_code(authenticator):
    failure = await _failure(authenticator, {"Accept": "application/json"})
    assert (failure.status, failure.error, failure.reason) == (401, None, "missing")
    assert www_authenticate(failure) == 'Bearer realm="forced-aligner"'


async def test_other_schemes_are_not_read(authenticator, api_key):
    failure = await _failure(authenticator, {"Authorization": f"Basic {api_key}"})
    assert (failure.status, failure.reason) == (401, "unsupported-scheme")


async def test_two_different_credentials_are_a_400(authenticator, api_key, api_key_store):
    other, _ = await api_key_store.create("someone-else", ["align"], "standard")
    failure = await _failure(authenticator, {"Authorization": f"Bearer {api_key}", "X-API-Key": other})
    assert (failure.status, failure.error, failure.reason) == (400, "invalid_request", "conflicting-credentials")


async def test_repeated_authorization_headers_are_a_400(authenticator, api_key):
    headers = Headers(raw=[(b"authorization", f"Bearer {api_key}".encode()), (b"authorization", b"Bearer other")])
    assert (await _failure(authenticator, headers)).reason == "conflicting-credentials"


@pytest.mark.parametrize("value", ["Bearer", "Bearer   ", "Bearer a b", "Bearer " + "a" * 9000])
async def test_malformed_bearer_values_are_a_400(authenticator, value):
    failure = await _failure(authenticator, {"Authorization": value})
    assert (failure.status, failure.error, failure.reason) == (400, "invalid_request", "malformed")


async def test_jwt_without_a_configured_issuer_list(api_key_store, issuer):
    authenticator = Authenticator(ApiKeyVerifier(api_key_store), jwt=None)
    token = issuer.mint(issuer.access_token_claims("worker", "align"))
    failure = await _failure(authenticator, {"Authorization": f"Bearer {token}"})
    assert (failure.status, failure.reason) == (401, "jwt-not-configured")


async def test_challenge_carries_a_sanitised_description(authenticator):
    failure = AuthFailure.invalid_token("expired", 'key "x" \\ expired', "api_key")
    assert www_authenticate(failure) == 'Bearer realm="forced-aligner", error="invalid_token", error_description="key x  expired"'


async def test_auth_failure_survives_pickling():
    failure = AuthFailure(403, "insufficient_scope", "needs admin", "insufficient-scope", "jwt", "admin")
    copy = pickle.loads(pickle.dumps(failure))
    fields = ("status", "error", "description", "reason", "method", "scope")
    assert [getattr(copy, name) for name in fields] == [getattr(failure, name) for name in fields]
    assert str(copy) == "403 insufficient-scope: needs admin"
