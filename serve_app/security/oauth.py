"""OAuth2 access tokens from trusted issuers -> `Principal` (RFC 9068 JWTs; RFC 7662 for opaque ones).

A JWT is checked in this order, each step failing with its own `AuthFailure.reason`:
1. shape: a JWS compact serialization whose payload is a JSON object ("malformed");
2. issuer: the unverified `iss` must be a configured issuer ("wrong-issuer"); from here on only
   THAT issuer's settings and keys are used, so one issuer can never vouch for another's tokens;
3. header: `alg` from the issuer's allow-list ("alg-not-allowed"; the list can hold neither `none`
   nor HS*, see settings.OAuthIssuer), `typ` at+jwt unless the issuer switches it off ("bad-typ");
4. key: the issuer's JWKS entry for `kid` ("unknown-kid"; see jwks.py for fetch rules);
5. signature ("bad-signature");
6. claims, with `leeway_s`: exp ("expired"), nbf/iat ("not-yet-valid"), iss exact, aud contains
   our audience ("wrong-audience"), exp/iat/iss/aud present and sub or client_id
   ("missing-claim").

Tokens that are not JWS compact form go to introspection when an issuer configures it.

Failure: an issuer whose keys cannot be fetched and are not cached -> AuthFailure 503
"issuer-unavailable", not 401: the token may be perfectly valid, and a 401 tells a client to throw
its credential away, while a 503 with Retry-After tells it to come back.

Every verification is done in full (no verified-token cache): the signature check is the cost,
and it is well under the latency budget (bench/auth.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
from joserfc import jws
from joserfc.errors import ExpiredTokenError, InvalidClaimError, JoseError, MissingClaimError
from joserfc.jws import CompactSignature, JWSRegistry
from joserfc.jwt import JWTClaimsRegistry

from serve_app.security.auth_failure import AuthFailure, Reason
from serve_app.security.introspection import IntrospectionStats, TokenIntrospector
from serve_app.security.jwks import IssuerKeys, IssuerUnavailable, JwksStats, is_acceptable_url
from serve_app.security.principal import Principal
from serve_app.security.token_claims import principal_from_claims
from serve_app.settings import OAuthIssuer, OAuthOptions

AT_JWT_TYPES = frozenset({"at+jwt", "application/at+jwt"})  # RFC 9068 §4; media types compare case-insensitively


@dataclass
class _TrustedIssuer:
    config: OAuthIssuer
    keys: IssuerKeys
    claims: JWTClaimsRegistry
    # One registry per allowed alg, each allowing only that alg. Unregistered header parameters
    # are tolerated (some issuers add their own); `crit` is still enforced.
    jws_registries: dict[str, JWSRegistry]


def _invalid(reason: Reason, description: str) -> AuthFailure:
    return AuthFailure.invalid_token(reason, description, "jwt")


class JwtVerifier:
    """`verify(token) -> Principal`, or AuthFailure. One per ingress replica (it holds the caches).

    `http_client` is owned by the caller (close it at shutdown). `introspection_client_secret` is
    Environment.introspection_client_secret, needed only when an issuer sets introspection_endpoint.
    """

    def __init__(
        self,
        options: OAuthOptions,
        http_client: httpx.AsyncClient,
        introspection_client_secret: str | None = None,
    ):
        for config in options.issuers:
            for url in (config.issuer, config.jwks_uri, config.introspection_endpoint):
                if url is not None and not is_acceptable_url(url):
                    raise ValueError(f"issuer {config.issuer}: {url} must be https (http only on loopback)")
        self._issuers = {config.issuer: self._trusted(config, options, http_client) for config in options.issuers}
        introspecting = [config for config in options.issuers if config.introspection_endpoint]
        if len(introspecting) > 1:
            # An opaque token names no issuer: sending it to several would leak it to all of them.
            raise ValueError("at most one issuer may configure introspection_endpoint")
        self._introspector = (
            TokenIntrospector(introspecting[0], options, http_client, introspection_client_secret or "")
            if introspecting
            else None
        )

    @staticmethod
    def _trusted(config: OAuthIssuer, options: OAuthOptions, http: httpx.AsyncClient) -> _TrustedIssuer:
        return _TrustedIssuer(
            config=config,
            keys=IssuerKeys(config.issuer, config.jwks_uri, options, http),
            claims=JWTClaimsRegistry(
                leeway=options.leeway_s,
                iss={"essential": True, "value": config.issuer},
                aud={"essential": True, "value": config.audience},
                exp={"essential": True},
                iat={"essential": True},
            ),
            jws_registries={
                alg: JWSRegistry(algorithms=[alg], strict_check_header=False) for alg in config.algorithms
            },
        )

    @property
    def jwks_stats(self) -> dict[str, JwksStats]:
        """Per issuer: JWKS fetches, failures, suppressed refetches, stale uses (for metrics)."""
        return {issuer: trusted.keys.stats for issuer, trusted in self._issuers.items()}

    @property
    def introspection_stats(self) -> IntrospectionStats | None:
        return self._introspector.stats if self._introspector else None

    async def verify(self, token: str) -> Principal:
        if token.count(".") != 2:
            if self._introspector is None:
                raise _invalid("malformed", "the access token is not a JWT")
            return await self._introspector.verify(token)
        signed, claims = _unverified(token)
        issuer = self._issuers.get(claims["iss"]) if isinstance(claims.get("iss"), str) else None
        if issuer is None:
            raise _invalid("wrong-issuer", "the token's issuer is not trusted")
        header = signed.headers()
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in issuer.jws_registries:
            raise _invalid("alg-not-allowed", "the token's signing algorithm is not accepted")
        if issuer.config.require_at_jwt_typ and str(header.get("typ", "")).lower() not in AT_JWT_TYPES:
            raise _invalid("bad-typ", "the token is not an access token (typ must be at+jwt)")
        try:
            key = await issuer.keys.key_for(header.get("kid"), alg)
        except IssuerUnavailable:
            raise AuthFailure.unavailable(
                "issuer-unavailable", "the token issuer cannot be reached; retry later", "jwt"
            ) from None
        if key is None:
            raise _invalid("unknown-kid", "the token's signing key is not published by its issuer")
        try:
            valid = jws.validate_compact(signed, key, registry=issuer.jws_registries[alg])
        except JoseError:
            valid = False
        if not valid:
            raise _invalid("bad-signature", "the token's signature is invalid")
        _validate_claims(issuer.claims, claims)
        return principal_from_claims(claims, issuer.config)


def _unverified(token: str) -> tuple[CompactSignature, dict[str, Any]]:
    """Header and claims before any check: only to pick the issuer, key and algorithm."""
    try:
        signed = jws.extract_compact(token.encode("ascii"))
        claims = json.loads(signed.payload)
    except (JoseError, ValueError):  # ValueError covers UnicodeError and JSONDecodeError
        raise _invalid("malformed", "the access token is malformed") from None
    if not isinstance(claims, dict):
        raise _invalid("malformed", "the access token is malformed")
    return signed, claims


def _validate_claims(registry: JWTClaimsRegistry, claims: dict[str, Any]) -> None:
    try:
        registry.validate(claims)
    except ExpiredTokenError:
        raise _invalid("expired", "the access token has expired") from None
    except MissingClaimError as error:
        raise _invalid("missing-claim", f"the access token lacks required claims: {error.claim}") from None
    except InvalidClaimError as error:
        raise _claim_failure(error.claim, claims) from None


def _claim_failure(claim: str, claims: dict[str, Any]) -> AuthFailure:
    value = claims.get(claim)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if claim in ("nbf", "iat") and is_number:
        return _invalid("not-yet-valid", "the access token is not valid yet")
    if claim == "aud":
        return _invalid("wrong-audience", "the access token is not meant for this service")
    if claim == "iss":
        return _invalid("wrong-issuer", "the token's issuer is not trusted")
    return _invalid("invalid-claim", f"the access token's {claim} claim is invalid")
