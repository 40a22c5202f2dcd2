"""From verified access-token claims (JWT or RFC 7662 introspection) to a `Principal`.

Shared by the JWT verifier and the introspector so both read scopes, identity and plan the same
way. Raises `AuthFailure` 401 for claims of the wrong shape.
"""

from __future__ import annotations

from typing import Any, Mapping

from serve_app.security.auth_failure import AuthFailure
from serve_app.security.principal import Principal
from serve_app.settings import OAuthIssuer


def audience_contains(aud: Any, audience: str) -> bool:
    """RFC 7519 §4.1.3: `aud` is one string or an array of strings."""
    if isinstance(aud, str):
        return aud == audience
    return isinstance(aud, list) and audience in aud


def principal_from_claims(claims: Mapping[str, Any], issuer: OAuthIssuer) -> Principal:
    """Principal id = client_id (the machine client), else sub; plan by client, else the default."""
    principal_id = claims.get("client_id") or claims.get("sub")
    if not principal_id:
        raise AuthFailure.invalid_token("missing-claim", "the token has neither client_id nor sub", "jwt")
    if not isinstance(principal_id, str):
        raise AuthFailure.invalid_token("invalid-claim", "the token's client_id or sub is not a string", "jwt")
    return Principal(
        method="jwt",
        id=principal_id,
        scopes=_scopes(claims),
        plan=issuer.plan_by_client.get(principal_id, issuer.default_plan),
    )


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """RFC 9068 `scope` (space-separated string), or `scp` (a string or an array, as some issuers send)."""
    for name in ("scope", "scp"):
        value = claims.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            return frozenset(value.split())
        if isinstance(value, list) and all(isinstance(scope, str) for scope in value):
            return frozenset(value)
        raise AuthFailure.invalid_token("invalid-claim", f"the token's {name} claim is malformed", "jwt")
    return frozenset()
