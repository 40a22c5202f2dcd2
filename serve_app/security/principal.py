"""Who is calling: the result of authentication, handed to the limiter and the audit log.

It never carries the credential itself: only the key id (API keys) or the client id (OAuth2),
and for OAuth2 the issuer that vouched for it: a client id means something only within its issuer.
Constructing a JWT principal without its issuer (or an API-key one with an issuer) is a ValueError.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

ISSUER_TAG_HEX_CHARS = 16  # 64 bits of SHA-256: a handful of configured issuers never collide


@dataclass(frozen=True)
class Principal:
    method: Literal["api_key", "jwt"]
    id: str  # API key id, or the token's client_id (sub when absent); never a secret
    scopes: frozenset[str]
    plan: str  # name of the rate-limit plan (settings.Plan) that applies
    issuer: str | None = None  # OAuth2: the configured issuer identifier (exact `iss`); API keys: None
    # Seconds since the credential store last confirmed this credential, when it was accepted from
    # a replica's stale copy because the store was unreachable (api_keys.ApiKeyVerifier); else None.
    stale_s: float | None = None

    def __post_init__(self) -> None:
        if (self.method == "jwt") != (self.issuer is not None):
            raise ValueError("a JWT principal names its issuer, an API-key principal none")

    @property
    def issuer_tag(self) -> str | None:
        """A short, fixed-length, separator-free stand-in for the issuer, for Redis keys."""
        if self.issuer is None:
            return None
        return hashlib.sha256(self.issuer.encode()).hexdigest()[:ISSUER_TAG_HEX_CHARS]

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes
