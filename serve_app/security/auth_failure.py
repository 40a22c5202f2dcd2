"""`AuthFailure`: why a request was not authenticated or not authorized, in one picklable value.

It lives in its own module so the verifiers (api_keys, oauth) and the `Authenticator` that routes
between them can all raise it without importing each other. Import it from
`serve_app.security.authenticate`, which re-exports it.

Fields:
- `status`: 400 (malformed request), 401 (no or bad credential), 403 (valid credential, missing
  scope) or 503 (the credential store or the issuer cannot be reached: the credential may well be
  valid, so the client should retry rather than discard it).
- `error`: the RFC 6750 error code, or None when no credential was sent (RFC 6750 §3.1: then the
  challenge carries no error) and for 503s, which RFC 6750 does not cover.
- `description`: safe to show the client. Never quotes the credential.
- `reason`: a stable short code for the audit log and metrics (see `Reason`).
- `method`: which verifier decided ("api_key" or "jwt"), None before one was chosen.
- `scope`: the scope that was missing (insufficient_scope only), for the WWW-Authenticate header.
"""

from __future__ import annotations

from typing import Literal

Method = Literal["api_key", "jwt"]
ErrorCode = Literal["invalid_request", "invalid_token", "insufficient_scope"]
Reason = Literal[
    # request shape
    "missing",  # no credential at all
    "unsupported-scheme",  # Authorization with a scheme other than Bearer
    "malformed",  # credential that is not a token of any kind we accept
    "conflicting-credentials",  # Authorization and X-API-Key both sent, with different values
    # API keys
    "bad-format",
    "bad-checksum",
    "unknown-key",
    "wrong-secret",
    "revoked",
    "store-unavailable",
    # JWT access tokens and introspection
    "wrong-issuer",
    "alg-not-allowed",
    "bad-typ",
    "unknown-kid",
    "bad-signature",
    "wrong-audience",
    "not-yet-valid",
    "missing-claim",
    "invalid-claim",
    "inactive",  # RFC 7662 introspection answered active=false
    "issuer-unavailable",
    "jwt-not-configured",
    # both
    "expired",
    "insufficient-scope",
]


class AuthFailure(Exception):
    """Raised by the verifiers and the `Authenticator`; the ingress turns it into a response."""

    def __init__(
        self,
        status: Literal[400, 401, 403, 503],
        error: ErrorCode | None,
        description: str,
        reason: Reason,
        method: Method | None = None,
        scope: str | None = None,
    ):
        # Every field goes to Exception.args, so the default pickling (cls(*args)) rebuilds it:
        # failures cross process boundaries in Ray.
        super().__init__(status, error, description, reason, method, scope)
        self.status = status
        self.error = error
        self.description = description
        self.reason = reason
        self.method = method
        self.scope = scope

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.description}"

    @classmethod
    def bad_request(cls, reason: Reason, description: str) -> "AuthFailure":
        return cls(400, "invalid_request", description, reason)

    @classmethod
    def invalid_token(cls, reason: Reason, description: str, method: Method | None) -> "AuthFailure":
        return cls(401, "invalid_token", description, reason, method)

    @classmethod
    def unavailable(cls, reason: Reason, description: str, method: Method) -> "AuthFailure":
        return cls(503, None, description, reason, method)
