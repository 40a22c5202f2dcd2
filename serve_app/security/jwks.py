"""One trusted issuer's signing keys: discovery, fetching, caching, and the rules that keep fetches rare.

- Where: the configured `jwks_uri`, else the `jwks_uri` of the issuer's metadata, tried at
  RFC 8414 `/.well-known/oauth-authorization-server` then OIDC `/.well-known/openid-configuration`.
  The metadata's `issuer` must equal the configured one (RFC 8414 §3.3), or it is ignored.
- How long: the JWKS response's Cache-Control max-age, clamped to [jwks_min_cache_s,
  jwks_max_cache_s]; no max-age means the minimum.
- How often: fetch attempts, successful or not, whatever prompted them (cold cache, stale keys, a
  token with an unknown kid), happen at most once per `jwks_refetch_interval_s`. A flood of tokens
  with random kids, or of requests while the issuer is down, costs at most one fetch per interval.
  Concurrent requests wanting a fetch share the one in flight.
- Failure: stale keys keep verifying while a background refresh is retried (each failure counted
  in `JwksStats`); with no keys at all, `IssuerUnavailable`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import Key, KeySet

from serve_app.settings import OAuthOptions

logger = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 256 * 1024  # metadata or JWKS; real ones are a few KiB
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|,)\s*(?:no-cache|no-store)\s*(?:,|$)", re.IGNORECASE)


class IssuerUnavailable(Exception):
    """No signing keys: the issuer could not be reached (or not yet retried) and nothing is cached."""


class FetchFailed(Exception):
    """An HTTP document could not be obtained or did not have the expected shape."""


@dataclass
class JwksStats:
    fetches: int = 0  # successful JWKS fetches
    fetch_failures: int = 0  # failed attempts (discovery or JWKS)
    refetches_suppressed: int = 0  # unknown kid, but the refetch interval had not elapsed
    stale_uses: int = 0  # tokens verified with keys past their cache lifetime


def is_acceptable_url(url: str) -> bool:
    """https, or http to a loopback host (local issuers and tests)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def discovery_urls(issuer: str) -> list[str]:
    """RFC 8414 §3.1 inserts the well-known segment before the issuer's path; OIDC appends it."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    origin = f"{parts.scheme}://{parts.netloc}"
    return [
        f"{origin}/.well-known/oauth-authorization-server{path}",
        f"{issuer.rstrip('/')}/.well-known/openid-configuration",
    ]


def cache_lifetime(cache_control: str | None, min_s: float, max_s: float) -> float:
    """Seconds to keep a JWKS: its max-age clamped to [min_s, max_s]; absent or no-cache -> min_s."""
    if not cache_control or _NO_CACHE.search(cache_control):
        return min_s
    match = _MAX_AGE.search(cache_control)
    if match is None:
        return min_s
    return max(min_s, min(max_s, float(match.group(1))))


async def get_json(http: httpx.AsyncClient, url: str, timeout_s: float) -> tuple[Any, httpx.Headers]:
    """GET a JSON document of bounded size; FetchFailed on any transport, status or parse error."""
    try:
        async with http.stream("GET", url, timeout=timeout_s, headers={"Accept": "application/json"}) as response:
            if response.status_code != 200:
                raise FetchFailed(f"HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise FetchFailed("document too large")
            return json.loads(body), response.headers
    except httpx.HTTPError as error:
        raise FetchFailed(type(error).__name__) from None
    except ValueError:
        raise FetchFailed("not JSON") from None


def _signing_keys(document: Any) -> KeySet:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise FetchFailed("not a JWK set")
    published = [key for key in document["keys"] if isinstance(key, dict) and key.get("use", "sig") == "sig"]
    try:
        return KeySet.import_key_set({"keys": published})
    except (JoseError, KeyError, TypeError, ValueError):
        raise FetchFailed("no usable signing key") from None


class IssuerKeys:
    """The cached JWKS of one issuer. Create one per issuer per process; it is not shared."""

    def __init__(self, issuer: str, jwks_uri: str | None, options: OAuthOptions, http: httpx.AsyncClient):
        self.issuer = issuer
        self._configured_jwks_uri = jwks_uri
        self._discovered_jwks_uri: str | None = None
        self._options = options
        self._http = http
        self._keys: KeySet | None = None
        self._fresh_until = -math.inf  # time.monotonic()
        self._last_attempt = -math.inf  # time.monotonic() of the latest fetch attempt
        self._lock = asyncio.Lock()
        self._background_refresh: asyncio.Task | None = None
        self.stats = JwksStats()

    async def key_for(self, kid: str | None, alg: str) -> Key | None:
        """The published key for this kid and alg (a permitted refetch included), or None.

        Raises IssuerUnavailable when there are no keys to look in, or a permitted refetch fails
        (the token may be signed with a key we could not fetch).
        """
        key = _find(await self._usable_keys(), kid, alg)
        if key is not None:
            return key
        # The issuer may have rotated to a key we have not seen yet.
        if not self._may_fetch():
            self.stats.refetches_suppressed += 1
            return None
        return _find(await self._refresh(), kid, alg)

    def _may_fetch(self) -> bool:
        # A fetch in flight may be joined at any time: it costs the issuer nothing more.
        in_flight = self._lock.locked()
        return in_flight or time.monotonic() - self._last_attempt >= self._options.jwks_refetch_interval_s

    async def _usable_keys(self) -> KeySet:
        if self._keys is None:
            if not self._may_fetch():
                raise IssuerUnavailable(self.issuer)
            return await self._refresh()
        if time.monotonic() >= self._fresh_until:
            self.stats.stale_uses += 1
            refreshing = self._background_refresh is not None and not self._background_refresh.done()
            if not refreshing and self._may_fetch():
                self._background_refresh = asyncio.get_running_loop().create_task(self._refresh_quietly())
        return self._keys

    async def _refresh_quietly(self) -> None:
        try:
            await self._refresh()
        except IssuerUnavailable:
            pass  # counted and logged in _refresh; the stale keys stay in use

    async def _refresh(self) -> KeySet:
        """Fetch the JWKS, or wait for the fetch in flight and take its result."""
        if self._lock.locked():
            async with self._lock:
                pass
            if self._keys is None:
                raise IssuerUnavailable(self.issuer)
            return self._keys
        # An unlocked asyncio.Lock is acquired without yielding: no other request slips in here.
        async with self._lock:
            self._last_attempt = time.monotonic()
            try:
                keys, lifetime_s = await self._fetch()
            except FetchFailed as error:
                self.stats.fetch_failures += 1
                # A discovered jwks_uri may have moved: discover again next time.
                self._discovered_jwks_uri = None
                logger.warning("JWKS fetch for issuer %s failed: %s", self.issuer, error)
                raise IssuerUnavailable(self.issuer) from None
            self._keys = keys
            self._fresh_until = time.monotonic() + lifetime_s
            self.stats.fetches += 1
            return keys

    async def _fetch(self) -> tuple[KeySet, float]:
        document, headers = await get_json(self._http, await self._jwks_uri(), self._options.http_timeout_s)
        lifetime_s = cache_lifetime(
            headers.get("cache-control"), self._options.jwks_min_cache_s, self._options.jwks_max_cache_s
        )
        return _signing_keys(document), lifetime_s

    async def _jwks_uri(self) -> str:
        if self._configured_jwks_uri:
            return self._configured_jwks_uri
        if self._discovered_jwks_uri:
            return self._discovered_jwks_uri
        for url in discovery_urls(self.issuer):
            try:
                metadata, _ = await get_json(self._http, url, self._options.http_timeout_s)
            except FetchFailed:
                continue
            if not isinstance(metadata, dict) or metadata.get("issuer") != self.issuer:
                continue
            jwks_uri = metadata.get("jwks_uri")
            if isinstance(jwks_uri, str) and is_acceptable_url(jwks_uri):
                self._discovered_jwks_uri = jwks_uri
                return jwks_uri
        raise FetchFailed("discovery found no jwks_uri")


def _find(keys: KeySet, kid: str | None, alg: str) -> Key | None:
    if kid is not None and not isinstance(kid, str):
        return None
    try:
        return keys.get_by_kid(kid, {"alg": alg, "use": "sig"})
    except InvalidKeyIdError:
        return None
