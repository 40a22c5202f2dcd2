"""API keys: the key format, their records in Redis, and per-request verification.

Format (GitHub-style, so a leaked key is recognisable and typos are caught offline):

    fa_<key id: 12 base62>_<secret: 32 base62><checksum: 6 base62>

The key id is not secret: it names the Redis record and is the `Principal.id`. The secret carries
~190 bits from `secrets`. The checksum is CRC32, in base62, over everything before it; a key whose
shape or checksum is wrong is rejected without touching Redis.

Storage: one Redis hash per key id holding HMAC-SHA-256(pepper, secret) in hex, never the secret
(keys are high-entropy, so a keyed fast hash is right; bcrypt per request would be a self-inflicted
DoS). Owner, scopes, plan and the lifecycle times sit beside it. Keys are never deleted: a revoked
or expired key stays readable for audit.

Verification costs at most one Redis round trip: records are cached per key id for `cache_s`, which
is therefore the bound on how long a revoked key keeps working on a replica while Redis answers.

Failure policy, Redis unreachable (a store error, never a "no such key" answer): a record Redis
returned within `stale_s` is still used, as a stale copy, so keys in use keep working through an
outage (as gateways such as Kong serve cached credentials with their database down); the
principal says how old its copy is (`Principal.stale_s`), and the ingress counts and audits each
such serve. Keys never seen by this replica, or last confirmed longer ago than `stale_s`, fail
closed: `AuthFailure` 503 "store-unavailable". The copy is only what Redis last said: a key
revoked or deleted while this replica cannot reach Redis keeps working until Redis answers again,
and is refused from the first request after that (the normal `cache_s` bound resumes). Secrets,
expiry and revocation are checked against the copy exactly as against a fresh record. The copy
is bounded by the keys that exist and were used here within `stale_s`; older entries are pruned.
`last_used_at` is written
behind: uses accumulate in memory and are flushed at most every `last_used_flush_s`, in the
background, never as a write per request.

The Redis client should be `redis_store.request_path_client(url)` (fails in milliseconds, not
seconds). Nothing here logs a key, a secret or a digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import secrets
import string
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Literal

from redis.asyncio import Redis

from serve_app.security.auth_failure import AuthFailure, Reason
from serve_app.security.principal import Principal
from serve_app.security.redis_store import STORE_ERRORS, StoreHealth, load_script

logger = logging.getLogger(__name__)

API_KEY_PREFIX = "fa_"
KEY_ID_LENGTH = 12
SECRET_LENGTH = 32
CHECKSUM_LENGTH = 6  # 62**6 > 2**32: any CRC32 fits
_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
_KEY_SHAPE = re.compile(
    rf"{API_KEY_PREFIX}([0-9A-Za-z]{{{KEY_ID_LENGTH}}})_([0-9A-Za-z]{{{SECRET_LENGTH}}})[0-9A-Za-z]{{{CHECKSUM_LENGTH}}}"
)
# RFC 6749 §3.3 scope-token characters; owners and plans are kept to printable, short names.
_SCOPE_SHAPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,64}")
_PLAN_SHAPE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_OWNER_SHAPE = re.compile(r"[\x20-\x7e]{1,200}")

_RECORD_PREFIX = "auth:apikey:"  # + key id -> hash
_INDEX = "auth:apikeys"  # set of every key id, for listing

MIN_PEPPER_BYTES = 16
DEFAULT_LAST_USED_FLUSH_S = 60.0  # IngressOptions.api_key_last_used_flush_s in the service


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(_BASE62[digit])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(_BASE62) for _ in range(length))


@dataclass(frozen=True)
class ParsedKey:
    key_id: str
    secret: str = field(repr=False)


def parse_api_key(text: str) -> ParsedKey | None:
    """The key id and secret of a well-formed key; None when the shape or the checksum is wrong."""
    match = _KEY_SHAPE.fullmatch(text)
    if match is None:
        return None
    key_id, secret = match.groups()
    if text != format_api_key(key_id, secret):  # the checksum is not secret: plain compare
        return None
    return ParsedKey(key_id, secret)


def format_api_key(key_id: str, secret: str) -> str:
    """The full key text for an id and a secret, checksum appended."""
    body = f"{API_KEY_PREFIX}{key_id}_{secret}"
    return body + _checksum(body)


KeyState = Literal["active", "expired", "revoked"]


@dataclass(frozen=True)
class KeyRecord:
    """One key's stored record. Times are Unix seconds."""

    key_id: str
    owner: str
    scopes: frozenset[str]
    plan: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None
    replaced_by: str | None  # key id issued by rotate()
    secret_digest: str = field(repr=False)

    def state(self, now: float) -> KeyState:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


class UnknownKey(LookupError):
    """No record for this key id."""


@dataclass
class LastUsedStats:
    flushes: int = 0  # flushes that wrote something
    flush_failures: int = 0  # Redis refused; the times stay pending for the next flush


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _optional_float(fields: dict[str, str], name: str) -> float | None:
    value = fields.get(name, "")
    return float(value) if value else None


def _record_from_hash(key_id: str, raw: dict) -> KeyRecord:
    fields = {_text(name): _text(value) for name, value in raw.items()}
    return KeyRecord(
        key_id=key_id,
        owner=fields["owner"],
        scopes=frozenset(fields["scopes"].split()),
        plan=fields["plan"],
        created_at=float(fields["created_at"]),
        expires_at=_optional_float(fields, "expires_at"),
        revoked_at=_optional_float(fields, "revoked_at"),
        last_used_at=_optional_float(fields, "last_used_at"),
        replaced_by=fields.get("replaced_by") or None,
        secret_digest=fields["secret_digest"],
    )


def _hash_from_record(record: KeyRecord) -> dict[str, str]:
    fields = {
        "owner": record.owner,
        "scopes": " ".join(sorted(record.scopes)),
        "plan": record.plan,
        "created_at": repr(record.created_at),
        "secret_digest": record.secret_digest,
    }
    if record.expires_at is not None:
        fields["expires_at"] = repr(record.expires_at)
    return fields


def _validated_scopes(scopes: Iterable[str]) -> frozenset[str]:
    scope_set = frozenset(scopes)
    if not scope_set or not all(_SCOPE_SHAPE.fullmatch(scope) for scope in scope_set):
        raise ValueError("scopes must be one or more RFC 6749 scope tokens")
    return scope_set


class ApiKeyStore:
    """Create, read and change API key records in Redis. Store errors propagate (redis_store.STORE_ERRORS)."""

    def __init__(self, redis: Redis, pepper: bytes, last_used_flush_s: float = DEFAULT_LAST_USED_FLUSH_S):
        if len(pepper) < MIN_PEPPER_BYTES:
            raise ValueError(f"the API key pepper must be at least {MIN_PEPPER_BYTES} bytes")
        self._redis = redis
        self._pepper = pepper
        self._last_used_flush_s = last_used_flush_s
        self._record_last_used = load_script(redis, "api_key_last_used.lua")
        self._pending_last_used: dict[str, float] = {}
        self._next_flush_at = time.monotonic() + last_used_flush_s
        self._flush_task: asyncio.Task | None = None
        self.last_used_stats = LastUsedStats()

    def secret_digest(self, secret: str) -> str:
        return hmac.new(self._pepper, secret.encode("ascii"), hashlib.sha256).hexdigest()

    async def create(
        self, owner: str, scopes: Iterable[str], plan: str, expires_in_s: float | None = None
    ) -> tuple[str, KeyRecord]:
        """A new key: its full text (show it once, it is not stored) and its record."""
        text, record = self._new_key(owner, scopes, plan, expires_in_s)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(_RECORD_PREFIX + record.key_id, mapping=_hash_from_record(record))
            pipe.sadd(_INDEX, record.key_id)
            await pipe.execute()
        return text, record

    def _new_key(
        self, owner: str, scopes: Iterable[str], plan: str, expires_in_s: float | None
    ) -> tuple[str, KeyRecord]:
        if not _OWNER_SHAPE.fullmatch(owner):
            raise ValueError("owner must be 1-200 printable ASCII characters")
        if not _PLAN_SHAPE.fullmatch(plan):
            raise ValueError("plan must be 1-64 characters of [A-Za-z0-9_.-]")
        if expires_in_s is not None and not (expires_in_s > 0 and math.isfinite(expires_in_s)):
            raise ValueError("expires_in_s must be a positive number of seconds")
        key_id, secret = _random_base62(KEY_ID_LENGTH), _random_base62(SECRET_LENGTH)
        now = time.time()
        record = KeyRecord(
            key_id=key_id,
            owner=owner,
            scopes=_validated_scopes(scopes),
            plan=plan,
            created_at=now,
            expires_at=None if expires_in_s is None else now + expires_in_s,
            revoked_at=None,
            last_used_at=None,
            replaced_by=None,
            secret_digest=self.secret_digest(secret),
        )
        return format_api_key(key_id, secret), record

    async def get(self, key_id: str) -> KeyRecord | None:
        raw = await self._redis.hgetall(_RECORD_PREFIX + key_id)
        return _record_from_hash(key_id, raw) if raw else None

    async def list(self, owner: str | None = None) -> list[KeyRecord]:
        """Every key (of `owner`, when given), oldest first."""
        key_ids = sorted(_text(key_id) for key_id in await self._redis.smembers(_INDEX))
        async with self._redis.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                pipe.hgetall(_RECORD_PREFIX + key_id)
            hashes = await pipe.execute()
        records = [_record_from_hash(key_id, raw) for key_id, raw in zip(key_ids, hashes) if raw]
        return sorted(
            (record for record in records if owner is None or record.owner == owner),
            key=lambda record: record.created_at,
        )

    async def revoke(self, key_id: str) -> KeyRecord:
        """Mark the key revoked (idempotent: the first revocation time is kept)."""
        record = await self._existing(key_id)
        if record.revoked_at is None:
            await self._redis.hset(_RECORD_PREFIX + key_id, "revoked_at", repr(time.time()))
        return await self._existing(key_id)

    async def rotate(self, key_id: str, overlap_s: float) -> tuple[str, KeyRecord]:
        """A new key with the same owner, scopes, plan and lifetime; the old key keeps working
        until now + overlap_s (or its own earlier expiry), so both are live during the overlap."""
        if not (overlap_s >= 0 and math.isfinite(overlap_s)):
            raise ValueError("overlap_s must be >= 0")
        old = await self._existing(key_id)
        now = time.time()
        if old.state(now) != "active":
            raise ValueError(f"key {key_id} is {old.state(now)}; only an active key can be rotated")
        lifetime_s = None if old.expires_at is None else old.expires_at - old.created_at
        text, new = self._new_key(old.owner, old.scopes, old.plan, lifetime_s)
        old_expires_at = min(now + overlap_s, old.expires_at if old.expires_at is not None else math.inf)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(_RECORD_PREFIX + new.key_id, mapping=_hash_from_record(new))
            pipe.sadd(_INDEX, new.key_id)
            pipe.hset(_RECORD_PREFIX + key_id, mapping={"expires_at": repr(old_expires_at), "replaced_by": new.key_id})
            await pipe.execute()
        return text, new

    async def _existing(self, key_id: str) -> KeyRecord:
        record = await self.get(key_id)
        if record is None:
            raise UnknownKey(key_id)
        return record

    def record_use(self, key_id: str) -> None:
        """Note a successful use in memory; a background flush writes it later (call from the loop)."""
        self._pending_last_used[key_id] = time.time()
        now = time.monotonic()
        flush_running = self._flush_task is not None and not self._flush_task.done()
        if now >= self._next_flush_at and not flush_running:
            self._next_flush_at = now + self._last_used_flush_s
            self._flush_task = asyncio.get_running_loop().create_task(self.flush_last_used())

    async def flush_last_used(self) -> int:
        """Write the pending last-used times; returns how many. Call it once more at shutdown."""
        pending, self._pending_last_used = self._pending_last_used, {}
        if not pending:
            return 0
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key_id, used_at in pending.items():
                    await self._record_last_used(keys=[_RECORD_PREFIX + key_id], args=[repr(used_at)], client=pipe)
                await pipe.execute()
        except STORE_ERRORS as error:
            # Keep the times for the next flush, newer uses winning.
            for key_id, used_at in pending.items():
                self._pending_last_used[key_id] = max(used_at, self._pending_last_used.get(key_id, 0.0))
            self.last_used_stats.flush_failures += 1
            logger.warning("last-used flush failed (%s); %d keys stay pending", type(error).__name__, len(pending))
            return 0
        self.last_used_stats.flushes += 1
        return len(pending)


@dataclass
class _CachedRecord:
    record: KeyRecord
    fetched_at: float  # time.monotonic() when Redis returned it


_PRUNE_INTERVAL_S = 60.0


class ApiKeyVerifier:
    """`verify(text) -> Principal`, or `AuthFailure`. One per ingress replica (it holds the cache)."""

    def __init__(self, store: ApiKeyStore, cache_s: float = 5.0, stale_s: float = 0.0):
        self._store = store
        self._cache_s = cache_s
        self._stale_s = stale_s
        # Only records that exist are cached, so the cache is bounded by the number of keys.
        self._cache: dict[str, _CachedRecord] = {}
        self._next_prune_at = time.monotonic() + _PRUNE_INTERVAL_S
        self.store_health = StoreHealth(logger, "API key verifier")  # .failures: lookups refused for it
        self.stale_serves = 0  # verifications answered from a stale copy while Redis was unreachable

    async def verify(self, text: str) -> Principal:
        parsed = parse_api_key(text)
        if parsed is None:
            reason: Reason = "bad-format" if _KEY_SHAPE.fullmatch(text) is None else "bad-checksum"
            raise AuthFailure.invalid_token(reason, "the API key is malformed", "api_key")
        record, stale_s = await self._record(parsed.key_id)
        # Unknown id and wrong secret read the same to the client: no probing for valid key ids.
        if record is None:
            raise AuthFailure.invalid_token("unknown-key", "invalid API key", "api_key")
        if not hmac.compare_digest(self._store.secret_digest(parsed.secret), record.secret_digest):
            raise AuthFailure.invalid_token("wrong-secret", "invalid API key", "api_key")
        state = record.state(time.time())
        if state != "active":
            raise AuthFailure.invalid_token(state, f"the API key is {state}", "api_key")
        if stale_s is not None:
            self.stale_serves += 1
        self._store.record_use(record.key_id)
        return Principal(method="api_key", id=record.key_id, scopes=record.scopes, plan=record.plan, stale_s=stale_s)

    async def _record(self, key_id: str) -> tuple[KeyRecord | None, float | None]:
        """The key's record, and how old it is when it is a stale copy served during an outage."""
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached.fetched_at < self._cache_s:
            return cached.record, None
        try:
            record = await self._store.get(key_id)
        except STORE_ERRORS as error:
            self.store_health.failed(error, f"API keys not confirmed within {self._stale_s:g} s are refused (503)")
            if cached is not None and now - cached.fetched_at < self._stale_s:
                return cached.record, now - cached.fetched_at
            raise AuthFailure.unavailable(
                "store-unavailable", "the credential store is unavailable; retry later", "api_key"
            ) from None
        self.store_health.answered()
        if record is None:
            self._cache.pop(key_id, None)
        elif max(self._cache_s, self._stale_s) > 0:
            self._cache[key_id] = _CachedRecord(record, now)
        self._prune(now)
        return record, None

    def _prune(self, now: float) -> None:
        """Drop copies too old to be served fresh or stale (keys no longer used here)."""
        if now < self._next_prune_at:
            return
        self._next_prune_at = now + _PRUNE_INTERVAL_S
        keep_s = max(self._cache_s, self._stale_s)
        for key_id in [key_id for key_id, cached in self._cache.items() if now - cached.fetched_at >= keep_s]:
            del self._cache[key_id]

    @property
    def cached_keys(self) -> int:
        return len(self._cache)
