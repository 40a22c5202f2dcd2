"""A real OAuth2 authorization server on loopback, for the auth tests and bench/auth.py.

It speaks HTTP on 127.0.0.1 (threaded http.server) and serves:
- RFC 8414 metadata at /.well-known/oauth-authorization-server and/or OIDC discovery at
  /.well-known/openid-configuration (choose with `metadata_documents`);
- the JWKS at /jwks, with `Cache-Control: max-age=<jwks_max_age_s>`;
- a client-credentials token endpoint at /token (RFC 6749 §4.4, client_secret_basic), issuing
  RFC 9068 JWT access tokens signed RS256, or opaque tokens for clients registered `opaque=True`;
- RFC 7662 introspection at /introspect (client_secret_basic), for those opaque tokens.

Test controls: `rotate_key()` publishes and signs with a new kid (old keys stay published);
`stop()` closes the socket so connections are refused, `start()` reopens the same port; `hits`
counts requests per path; `mint()` signs arbitrary headers/claims with any key, and
`unsigned_token()` / `hs256_with_public_key()` build the classic attack tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from tools.local_services import free_port

AUDIENCE = "https://aligner.test/api"
METADATA_DOCUMENTS = ("oauth-authorization-server", "openid-configuration")


@dataclass(frozen=True)
class RegisteredClient:
    secret: str
    scopes: frozenset[str]
    opaque: bool = False  # issue opaque tokens (introspection) instead of JWTs


def new_rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, {"kid": uuid.uuid4().hex[:16], "alg": "RS256", "use": "sig"})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_json(value: dict) -> str:
    return _b64url(json.dumps(value, separators=(",", ":")).encode())


class LoopbackIssuer:
    def __init__(
        self,
        audience: str = AUDIENCE,
        jwks_max_age_s: int = 300,
        token_lifetime_s: int = 300,
        metadata_documents: tuple[str, ...] = METADATA_DOCUMENTS,
    ):
        self.audience = audience
        self.jwks_max_age_s = jwks_max_age_s
        self.token_lifetime_s = token_lifetime_s
        self.metadata_documents = metadata_documents
        self.port = free_port()
        self.hits: Counter[str] = Counter()
        self._keys: list[RSAKey] = [new_rsa_key()]
        self._clients: dict[str, RegisteredClient] = {}
        self._opaque_tokens: dict[str, dict[str, Any]] = {}  # token -> introspection answer
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- addresses -------------------------------------------------------------------------
    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_endpoint(self) -> str:
        return self.issuer + "/token"

    @property
    def jwks_uri(self) -> str:
        return self.issuer + "/jwks"

    @property
    def introspection_endpoint(self) -> str:
        return self.issuer + "/introspect"

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "LoopbackIssuer":
        server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler_class())
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._server = server
        return self

    def stop(self) -> None:
        """Go down: the port refuses connections until start()."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- state -------------------------------------------------------------------------------
    def register_client(self, client_id: str, secret: str, scopes: tuple[str, ...] = ("align",), opaque: bool = False) -> None:
        self._clients[client_id] = RegisteredClient(secret, frozenset(scopes), opaque)

    @property
    def current_key(self) -> RSAKey:
        return self._keys[-1]

    def rotate_key(self) -> str:
        """Sign with a new key from now on; the old ones stay published. Returns the new kid."""
        with self._lock:
            self._keys.append(new_rsa_key())
        return self.current_key.kid

    def public_jwks(self) -> dict:
        return KeySet(list(self._keys)).as_dict(private=False)

    def revoke_opaque(self, token: str) -> None:
        self._opaque_tokens.pop(token, None)

    # --- tokens ------------------------------------------------------------------------------
    def access_token_claims(self, client_id: str, scope: str, /, **overrides: Any) -> dict[str, Any]:
        """RFC 9068 claims as this issuer would sign them; an override of None drops the claim."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": client_id,
            "client_id": client_id,
            "aud": self.audience,
            "iat": now,
            "exp": now + self.token_lifetime_s,
            "jti": uuid.uuid4().hex,
            "scope": scope,
        }
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not None}

    def mint(
        self,
        claims: dict[str, Any],
        key: RSAKey | None = None,
        typ: str | None = "at+jwt",
        alg: str = "RS256",
        kid: str | None = None,
    ) -> str:
        """Sign `claims` with `key` (default: the current key) and the header given."""
        key = key or self.current_key
        header = {"alg": alg, "kid": kid or key.kid}
        if typ is not None:
            header["typ"] = typ
        return jwt.encode(header, claims, key, algorithms=[alg], default_type=None)

    def _issue(self, client_id: str, client: RegisteredClient, scope: str) -> str:
        if not client.opaque:
            return self.mint(self.access_token_claims(client_id, scope))
        token = secrets.token_urlsafe(32)
        answer = {"active": True, "token_type": "Bearer", **self.access_token_claims(client_id, scope)}
        self._opaque_tokens[token] = answer
        return token

    # --- HTTP --------------------------------------------------------------------------------
    def _authenticated_client(self, authorization: str | None) -> tuple[str, RegisteredClient] | None:
        """client_secret_basic (RFC 6749 §2.3.1)."""
        if not authorization or not authorization.startswith("Basic "):
            return None
        try:
            client_id, _, secret = base64.b64decode(authorization[6:]).decode().partition(":")
        except ValueError:
            return None
        client = self._clients.get(client_id)
        if client is None or not hmac.compare_digest(client.secret, secret):
            return None
        return client_id, client

    def _metadata(self) -> dict:
        return {
            "issuer": self.issuer,
            "token_endpoint": self.token_endpoint,
            "jwks_uri": self.jwks_uri,
            "introspection_endpoint": self.introspection_endpoint,
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
        }

    def _answer_get(self, path: str) -> tuple[int, dict, dict[str, str]]:
        documents = {f"/.well-known/{name}": name for name in self.metadata_documents}
        if path in documents:
            return 200, self._metadata(), {}
        if path == "/jwks":
            return 200, self.public_jwks(), {"Cache-Control": f"public, max-age={self.jwks_max_age_s}"}
        return 404, {"error": "not_found"}, {}

    def _answer_post(self, path: str, form: dict[str, str], authorization: str | None) -> tuple[int, dict, dict[str, str]]:
        if path not in ("/token", "/introspect"):
            return 404, {"error": "not_found"}, {}
        authenticated = self._authenticated_client(authorization)
        if authenticated is None:
            return 401, {"error": "invalid_client"}, {"WWW-Authenticate": 'Basic realm="issuer"'}
        client_id, client = authenticated
        if path == "/introspect":
            return 200, self._opaque_tokens.get(form.get("token", ""), {"active": False}), {}
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}, {}
        requested = form.get("scope", " ".join(sorted(client.scopes))).split()
        if not set(requested) <= client.scopes:
            return 400, {"error": "invalid_scope"}, {}
        scope = " ".join(requested)
        token = self._issue(client_id, client, scope)
        body = {"access_token": token, "token_type": "Bearer", "expires_in": self.token_lifetime_s, "scope": scope}
        return 200, body, {"Cache-Control": "no-store"}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                issuer.hits[path] += 1
                self._send(*issuer._answer_get(path))

            def do_POST(self) -> None:
                path = urlsplit(self.path).path
                issuer.hits[path] += 1
                body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
                form = {name: values[-1] for name, values in parse_qs(body).items()}
                self._send(*issuer._answer_post(path, form, self.headers.get("Authorization")))

            def _send(self, status: int, document: dict, headers: dict[str, str]) -> None:
                payload = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

        return Handler


# --- attack tokens -------------------------------------------------------------------------
def unsigned_token(claims: dict[str, Any], kid: str | None = None) -> str:
    """`alg: none` with an empty signature (RFC 7519 §6 unsecured JWT)."""
    header = {"alg": "none", "typ": "at+jwt", **({"kid": kid} if kid else {})}
    return f"{_b64url_json(header)}.{_b64url_json(claims)}."


def hs256_with_public_key(claims: dict[str, Any], public_key: RSAKey) -> str:
    """The key-confusion attack: HMAC-SHA256 keyed with the issuer's *public* key (PEM), which a
    verifier that lets the token choose its algorithm would accept."""
    header = {"alg": "HS256", "typ": "at+jwt", "kid": public_key.kid}
    signing_input = f"{_b64url_json(header)}.{_b64url_json(claims)}"
    pem = public_key.as_pem(private=False)
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64url(signature)}"
