"""Abuse detection: sliding-window event counts per IP and per principal, and temporary bans.

Events: auth_failure, malware, rate_limited. Each (event, subject) has a sliding window in Redis
(a sorted set, trimmed on every event, in one atomic script: abuse_record.lua). Crossing the
event's threshold (AbuseOptions) bans the subject for `ban_s`; each further offence within the
offence memory doubles the ban, up to `max_ban_s`. Subjects are "ip:<address block>" (see
client_ip.address_block: the address for IPv4, its /64 for IPv6) and "principal:<principal key>"
(see ratelimit.principal_key). Addresses in `allow_networks` are never counted or banned; their
principals still can be.

Only hostile signals count, never an honest mistake: a ban also locks out everyone behind the same
office address, so a signal counts only if a well-behaved client cannot earn it by sending what it
believes is a real recording. Hence:
- credential failures (400/401), by IP;
- malware detections (`HOSTILE_REFUSALS`); every other scanner refusal (unsupported format,
  undecodable, too long, too many channels, decode timeout, ...) is benign and counts toward no
  ban: a decoder bomb or a lying header is refused with the same answer an honest over-long file
  gets, and cannot be told apart from one. The requests bucket already bounds how often anyone
  can make the scanner refuse something;
- quota refusals (429) repeated `max_rate_limit_hits` times in the window: a client retrying
  without honouring Retry-After.
One malware detection does not ban (`max_malware_hits` defaults to 3 in the window): signatures
have false positives, and the upload is refused whatever the count; repeated hits ban the principal
and the address.

Record auth failures against the IP only: a claimed key id is not proof of identity, and
counting failures against it would let anyone get a victim's key banned by sending wrong secrets
with its (non-secret) id.

The request path reads bans in the same round trip as its rate-limit decision: `ban_check` names
the keys, the token-bucket script reads them (ratelimit.TokenBucketLimiter's `blockers`), and
`ban_found` makes a Ban of what it read. `is_banned` is the same read on its own.

Failure behaviour: `is_banned` fails open (no ban) and `record` drops the event when Redis fails;
both are counted in `store_health`. A ban read with a rate-limit decision fails open too (nobody
is banned while the limiter cannot reach Redis), counted in the limiter's store health.
`list_bans` and `lift` are operator actions and raise.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from redis.asyncio import Redis

from serve_app.security.client_ip import address_block, in_networks, parse_address, parse_networks
from serve_app.security.redis_store import STORE_ERRORS, StoreHealth, load_script
from serve_app.settings import AbuseOptions

logger = logging.getLogger(__name__)

AbuseEvent = Literal["auth_failure", "malware", "rate_limited"]
ABUSE_EVENTS: tuple[str, ...] = get_args(AbuseEvent)

# The scanner refusals (problem slugs) that count toward bans; every other refusal is benign.
HOSTILE_REFUSALS: dict[str, AbuseEvent] = {"malware-detected": "malware"}

KEY_PREFIX = "abuse"


@dataclass(frozen=True)
class Ban:
    subject: str  # "ip:203.0.113.7" or "principal:api_key:k_123"
    reason: str  # the event that crossed its threshold
    offence: int  # 1 for a first ban, n for the n-th within the offence memory
    duration_s: int  # how long it was imposed for
    retry_after_s: int  # how long it still runs


@dataclass(frozen=True)
class BanCheck:
    """Whose bans to read, and under which keys (the same order)."""

    subjects: tuple[str, ...]
    keys: tuple[str, ...]


def refusal_event(slug: str) -> AbuseEvent | None:
    """The abuse event a refused upload counts as, or None for a benign refusal."""
    return HOSTILE_REFUSALS.get(slug)


def ip_subject(ip: str) -> str:
    return f"ip:{address_block(ip)}"


def principal_subject(principal_key: str) -> str:
    return f"principal:{principal_key}"


class AbuseMonitor:
    def __init__(self, redis: Redis, options: AbuseOptions):
        self._redis = redis
        self._record_script = load_script(redis, "abuse_record.lua")
        self.reconfigure(options)
        self.store_health = StoreHealth(logger, "abuse monitor")

    def reconfigure(self, options: AbuseOptions) -> None:
        self._options = options
        self._allowed_networks = parse_networks(tuple(options.allow_networks))
        self._thresholds: dict[str, int] = {
            "auth_failure": options.max_auth_failures,
            "malware": options.max_malware_hits,
            "rate_limited": options.max_rate_limit_hits,
        }

    def ban_check(self, ip: str | None, principal_key: str | None = None) -> BanCheck:
        """The ban keys of this IP and principal, for a store call that reads them (`ban_found` reads the answer)."""
        subjects = tuple(self._subjects(ip, principal_key))
        return BanCheck(subjects, tuple(_ban_key(subject) for subject in subjects))

    @staticmethod
    def ban_found(check: BanCheck, read: Sequence[tuple[str | bytes | None, int]]) -> Ban | None:
        """The ban (the longer-running, if several) among what was read for `check`'s keys: (value, PTTL ms) each."""
        bans = [_ban(subject, value, ttl_ms) for subject, (value, ttl_ms) in zip(check.subjects, read)]
        return max((ban for ban in bans if ban), key=lambda ban: ban.retry_after_s, default=None)

    async def is_banned(self, ip: str, principal_key: str | None = None) -> Ban | None:
        """The ban (the longer-running, if both are banned) on this IP or principal; one round trip."""
        check = self.ban_check(ip, principal_key)
        if not check.keys:
            return None
        try:
            async with self._redis.pipeline(transaction=False) as pipeline:
                for key in check.keys:
                    pipeline.get(key).pttl(key)
                replies = await pipeline.execute()
        except STORE_ERRORS as error:
            self.store_health.failed(error, "nobody is treated as banned (fail open)")
            return None
        self.store_health.answered()
        return self.ban_found(check, list(zip(replies[::2], replies[1::2])))

    async def record(self, event: AbuseEvent, ip: str | None, principal_key: str | None = None) -> list[Ban]:
        """Count one event against the IP and the principal; returns the bans this event imposed."""
        if event not in self._thresholds:
            raise ValueError(f"unknown abuse event {event!r}")
        subjects = self._subjects(ip, principal_key)
        if not subjects:
            return []
        keys = [key for subject in subjects for key in (_events_key(event, subject), _ban_key(subject), _offences_key(subject))]
        options = self._options
        arguments = [
            event,
            options.window_s * 1000,
            self._thresholds[event],
            options.ban_s,
            options.max_ban_s,
            self._options.offence_memory_s,
            secrets.token_hex(8),
        ]
        try:
            imposed = await self._record_script(keys=keys, args=arguments)
        except STORE_ERRORS as error:
            self.store_health.failed(error, "abuse events are not counted")
            return []
        self.store_health.answered()
        bans = [
            Ban(subject, event, int(offence), int(ban_s), int(ban_s))
            for subject, ban_s, offence in zip(subjects, imposed[::2], imposed[1::2])
            if int(ban_s)
        ]
        for ban in bans:
            logger.warning("banned %s for %d s after repeated %s", ban.subject, ban.duration_s, event)
        return bans

    async def list_bans(self) -> list[Ban]:
        """Every ban in force, sorted by subject (operators' view)."""
        keys = [key async for key in self._redis.scan_iter(match=f"{KEY_PREFIX}:ban:*", count=1000)]
        if not keys:
            return []
        async with self._redis.pipeline(transaction=False) as pipeline:
            for key in keys:
                pipeline.get(key).pttl(key)
            replies = await pipeline.execute()
        prefix_length = len(f"{KEY_PREFIX}:ban:")
        bans = [_ban(_text(key)[prefix_length:], value, ttl_ms) for key, value, ttl_ms in zip(keys, replies[::2], replies[1::2])]
        return sorted((ban for ban in bans if ban), key=lambda ban: ban.subject)

    async def lift(self, subject: str) -> bool:
        """End a subject's ban and forget its offences and pending events; False if it was not banned.

        An "ip:" subject may name any address of the block, as "ip:2001:db8::7" for "ip:2001:db8::/64".
        """
        if not subject.startswith(("ip:", "principal:")):
            raise ValueError("a subject is 'ip:<address>' or 'principal:<principal key>'")
        if subject.startswith("ip:"):
            subject = ip_subject(subject.removeprefix("ip:"))
        async with self._redis.pipeline(transaction=True) as pipeline:
            pipeline.delete(_ban_key(subject))
            pipeline.delete(_offences_key(subject), *(_events_key(event, subject) for event in ABUSE_EVENTS))
            was_banned, _ = await pipeline.execute()
        if was_banned:
            logger.warning("ban on %s lifted", subject)
        return bool(was_banned)

    def _subjects(self, ip: str | None, principal_key: str | None) -> list[str]:
        subjects = []
        if ip and not self._is_allowed(ip):
            subjects.append(ip_subject(ip))
        if principal_key:
            subjects.append(principal_subject(principal_key))
        return subjects

    def _is_allowed(self, ip: str) -> bool:
        address = parse_address(ip)
        return address is not None and in_networks(address, self._allowed_networks)


def _ban_key(subject: str) -> str:
    return f"{KEY_PREFIX}:ban:{subject}"


def _offences_key(subject: str) -> str:
    return f"{KEY_PREFIX}:offences:{subject}"


def _events_key(event: str, subject: str) -> str:
    return f"{KEY_PREFIX}:events:{event}:{subject}"


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ban(subject: str, value: str | bytes | None, ttl_ms: int) -> Ban | None:
    """A stored ban; None if absent or expired between the two reads."""
    if value is None or ttl_ms == -2:
        return None
    stored = json.loads(_text(value))
    duration_s = int(stored["duration_s"])
    retry_after_s = math.ceil(ttl_ms / 1000) if ttl_ms > 0 else duration_s
    return Ban(subject, stored["reason"], int(stored["offence"]), duration_s, retry_after_s)
