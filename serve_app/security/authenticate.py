"""Who is calling, and may they do this: credentials from request headers to a `Principal`.

Credentials are read from two headers only, never from the query string (URLs end up in logs,
proxies and browser history):
- `Authorization: Bearer <token>`: an API key (recognised by its `fa_` prefix) or an OAuth2
  access token;
- `X-API-Key: <key>`: an API key.
Sending both with different values is a 400 (which one was meant is a guess we refuse to make).

`authorize(principal, scope)` is the 403 step; `www_authenticate(failure)` renders the RFC 6750
challenge for 400/401/403 answers (503s carry Retry-After instead).
"""

from __future__ import annotations

import re
from typing import Mapping

from serve_app.security.api_keys import API_KEY_PREFIX, ApiKeyVerifier
from serve_app.security.auth_failure import AuthFailure
from serve_app.security.oauth import JwtVerifier
from serve_app.security.principal import Principal

__all__ = ["AuthFailure", "Authenticator", "www_authenticate", "REALM"]

REALM = "forced-aligner"
MAX_CREDENTIAL_CHARS = 8192  # far above any real JWT; a bound before any parsing
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 §2.1 b64token
# RFC 6750 §3: error_description and scope use these characters only.
_NOT_CHALLENGE_SAFE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


def _header_values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every value of a header: Starlette's Headers keeps repeats (getlist); a dict has one."""
    getlist = getattr(headers, "getlist", None)
    if getlist is not None:
        return list(getlist(name))
    return [value for key, value in headers.items() if key.lower() == name]


def _single(headers: Mapping[str, str], name: str) -> str | None:
    values = _header_values(headers, name)
    if len(values) > 1:
        raise AuthFailure.bad_request("conflicting-credentials", f"more than one {name} header")
    return values[0] if values else None


def _bearer_token(authorization: str) -> str:
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthFailure(401, None, "use the Bearer scheme or the X-API-Key header", "unsupported-scheme")
    return token.strip()


def _checked(credential: str) -> str:
    if len(credential) > MAX_CREDENTIAL_CHARS or not _BEARER_TOKEN.fullmatch(credential):
        raise AuthFailure.bad_request("malformed", "the credential is empty or malformed")
    return credential


class Authenticator:
    """One per ingress replica: it holds the verifiers, and they hold the caches."""

    def __init__(self, api_keys: ApiKeyVerifier, jwt: JwtVerifier | None):
        self._api_keys = api_keys
        self._jwt = jwt

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The caller's principal, or AuthFailure (400 malformed, 401 bad or none, 503 store/issuer down)."""
        authorization = _single(headers, "authorization")
        api_key_header = _single(headers, "x-api-key")
        bearer = _checked(_bearer_token(authorization)) if authorization is not None else None
        api_key = _checked(api_key_header.strip()) if api_key_header is not None else None
        if bearer is not None and api_key is not None and bearer != api_key:
            raise AuthFailure.bad_request("conflicting-credentials", "send one credential, not two different ones")
        if api_key is not None:
            return await self._api_keys.verify(api_key)
        if bearer is None:
            raise AuthFailure(401, None, "authentication required", "missing")
        # A JWT starts with "eyJ" (base64url of '{"'), so the prefix alone tells them apart, and a
        # mistyped API key gets the API key verifier's precise answer (bad checksum).
        if bearer.startswith(API_KEY_PREFIX):
            return await self._api_keys.verify(bearer)
        if self._jwt is None:
            raise AuthFailure.invalid_token("jwt-not-configured", "only API keys are accepted", None)
        return await self._jwt.verify(bearer)

    @staticmethod
    def authorize(principal: Principal, scope: str) -> None:
        """403 insufficient_scope unless the principal holds `scope`."""
        if not principal.has_scope(scope):
            raise AuthFailure(
                403, "insufficient_scope", f"this request needs the {scope} scope", "insufficient-scope",
                principal.method, scope,
            )  # fmt: skip


def www_authenticate(failure: AuthFailure, realm: str = REALM) -> str:
    """The RFC 6750 §3 `WWW-Authenticate` value for a 400/401/403 answer."""
    parameters = [f'realm="{realm}"']
    if failure.error is not None:
        parameters.append(f'error="{failure.error}"')
        parameters.append(f'error_description="{_NOT_CHALLENGE_SAFE.sub("", failure.description)}"')
    if failure.error == "insufficient_scope" and failure.scope:
        parameters.append(f'scope="{_NOT_CHALLENGE_SAFE.sub("", failure.scope)}"')
    return "Bearer " + ", ".join(parameters)
