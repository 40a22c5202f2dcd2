"""Who is calling: the result of authentication, handed to the limiter and the audit log.

It never carries the credential itself: only the key id (API keys) or the client id (OAuth2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Principal:
    method: Literal["api_key", "jwt"]
    id: str  # API key id, or the token's client_id (sub when absent); never a secret
    scopes: frozenset[str]
    plan: str  # name of the rate-limit plan (settings.Plan) that applies
    # Seconds since the credential store last confirmed this credential, when it was accepted from
    # a replica's stale copy because the store was unreachable (api_keys.ApiKeyVerifier); else None.
    stale_s: float | None = None

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes
