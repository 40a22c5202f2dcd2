"""RFC 7662 token introspection, for opaque (non-JWT) access tokens of one configured issuer.

The token is POSTed to the issuer's introspection endpoint with our client credentials
(client_secret_basic). It is accepted only when the answer says `active: true` and passes the
same checks as a JWT: `iss` (when present) is the issuer, `aud` contains our audience, `exp` (when
present) has not passed. Accepted answers are cached by SHA-256 of the token for
min(exp - now, 60 s): a token revoked at the issuer keeps working here for at most that long.
Rejections are not cached.

Failure: issuer unreachable, or answering anything but 200 with a JSON object (our client
credentials wrong, say) -> AuthFailure 503 "issuer-unavailable": the token may well be valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import httpx

from serve_app.security.auth_failure import AuthFailure
from serve_app.security.principal import Principal
from serve_app.security.token_claims import audience_contains, principal_from_claims
from serve_app.settings import OAuthIssuer, OAuthOptions

logger = logging.getLogger(__name__)

CACHE_MAX_S = 60.0
CACHE_MAX_ENTRIES = 10_000
MAX_RESPONSE_BYTES = 64 * 1024


@dataclass
class IntrospectionStats:
    requests: int = 0  # POSTs sent to the issuer
    failures: int = 0  # the issuer could not answer
    cache_hits: int = 0


@dataclass
class _CachedPrincipal:
    principal: Principal
    valid_until: float  # time.monotonic()


class TokenIntrospector:
    def __init__(self, issuer: OAuthIssuer, options: OAuthOptions, http: httpx.AsyncClient, client_secret: str):
        if not (issuer.introspection_endpoint and issuer.introspection_client_id and client_secret):
            raise ValueError("introspection needs an endpoint, a client id and a client secret")
        self._issuer = issuer
        self._endpoint: str = issuer.introspection_endpoint
        self._options = options
        self._http = http
        self._auth = httpx.BasicAuth(issuer.introspection_client_id, client_secret)
        self._cache: dict[str, _CachedPrincipal] = {}
        self._healthy = True
        self.stats = IntrospectionStats()

    async def verify(self, token: str) -> Principal:
        token_hash = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(token_hash)
        if cached is not None and now < cached.valid_until:
            self.stats.cache_hits += 1
            return cached.principal
        answer = await self._ask(token)
        principal, lifetime_s = self._check(answer)
        self._remember(token_hash, _CachedPrincipal(principal, now + lifetime_s))
        return principal

    async def _ask(self, token: str) -> dict:
        self.stats.requests += 1
        try:
            response = await self._http.post(
                self._endpoint,
                data={"token": token, "token_type_hint": "access_token"},
                auth=self._auth,
                headers={"Accept": "application/json"},
                timeout=self._options.http_timeout_s,
            )
            if response.status_code != 200 or len(response.content) > MAX_RESPONSE_BYTES:
                raise ValueError(f"HTTP {response.status_code}")
            answer = json.loads(response.content)
            if not isinstance(answer, dict):
                raise ValueError("not a JSON object")
        except (httpx.HTTPError, ValueError) as error:
            self.stats.failures += 1
            if self._healthy:  # log when failures start, not once per request
                # Neither our messages nor httpx's quote the request body (the token).
                logger.error("introspection at %s failed: %s: %s", self._issuer.issuer, type(error).__name__, error)
            self._healthy = False
            raise AuthFailure.unavailable(
                "issuer-unavailable", "the token issuer cannot be reached; retry later", "jwt"
            ) from None
        if not self._healthy:
            logger.warning("introspection at %s answers again", self._issuer.issuer)
        self._healthy = True
        return answer

    def _check(self, answer: dict) -> tuple[Principal, float]:
        if answer.get("active") is not True:
            raise AuthFailure.invalid_token("inactive", "the access token is not active", "jwt")
        if "iss" in answer and answer["iss"] != self._issuer.issuer:
            raise AuthFailure.invalid_token("wrong-issuer", "the token's issuer is not trusted", "jwt")
        if not audience_contains(answer.get("aud"), self._issuer.audience):
            raise AuthFailure.invalid_token("wrong-audience", "the token is not meant for this service", "jwt")
        lifetime_s = CACHE_MAX_S
        exp = answer.get("exp")
        if exp is not None:
            if not isinstance(exp, (int, float)) or isinstance(exp, bool):
                raise AuthFailure.invalid_token("invalid-claim", "the token's exp is malformed", "jwt")
            remaining_s = exp - time.time()
            if remaining_s <= -self._options.leeway_s:
                raise AuthFailure.invalid_token("expired", "the access token has expired", "jwt")
            lifetime_s = min(CACHE_MAX_S, max(remaining_s, 0.0))
        return principal_from_claims(answer, self._issuer), lifetime_s

    def _remember(self, token_hash: str, entry: _CachedPrincipal) -> None:
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            now = time.monotonic()
            self._cache = {key: value for key, value in self._cache.items() if value.valid_until > now}
            while len(self._cache) >= CACHE_MAX_ENTRIES:
                del self._cache[next(iter(self._cache))]  # the oldest insertion
        self._cache[token_hash] = entry
