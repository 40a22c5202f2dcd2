"""From verified access-token claims (JWT or RFC 7662 introspection) to a `Principal`.

Shared by the JWT verifier and the introspector so both read scopes, identity and plan the same
way. Raises `AuthFailure` 401 for claims of the wrong shape.

Scopes: `scope` must be the space-separated string RFC 9068 §2.2.3 (via RFC 8693 §4.2) and RFC 7662
define; a `scope` of any other shape (a JSON array included) is refused 401 invalid_token, since a
token whose issuer writes a standard claim in a non-standard shape is one we cannot be sure we read
as its issuer meant. `scp` (not in any RFC; Okta writes an array, Entra ID a string) is read in
either shape when there is no `scope`.
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
        issuer=issuer.issuer,
    )


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """RFC 9068 `scope` (a space-separated string only), else `scp` (a string or an array)."""
    scope = claims.get("scope")
    if scope is not None:
        if isinstance(scope, str):
            return frozenset(scope.split())
        raise AuthFailure.invalid_token("invalid-claim", "the token's scope claim must be a space-separated string (RFC 9068)", "jwt")
    scp = claims.get("scp")
    if scp is None:
        return frozenset()
    if isinstance(scp, str):
        return frozenset(scp.split())
    if isinstance(scp, list) and all(isinstance(scope, str) for scope in scp):
        return frozenset(scp)
    raise AuthFailure.invalid_token("invalid-claim", "the token's scp claim is malformed", "jwt")
