"""Abuse detection: sliding-window event counts per IP and per principal, and temporary bans.

Events: auth_failure, rejected_upload, malware, rate_limited. Each (event, subject) has a sliding
window in Redis (a sorted set, trimmed on every event, in one atomic script: abuse_record.lua).
Crossing the event's threshold (AbuseOptions) bans the subject for `ban_s`; each further offence
within the offence memory doubles the ban, up to `max_ban_s`. Subjects are "ip:<address>" and
"principal:<principal key>" (see ratelimit.principal_key). Addresses in `allow_networks` are never
counted or banned; their principals still can be.

Record auth failures against the IP only: a claimed key id is not proof of identity, and
counting failures against it would let anyone get a victim's key banned by sending wrong secrets
with its (non-secret) id.

Failure behaviour: `is_banned` fails open (no ban) and `record` drops the event when Redis fails;
both are counted in `store_health`. `list_bans` and `lift` are operator actions and raise.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from dataclasses import dataclass
from typing import Literal, get_args

from redis.asyncio import Redis

from serve_app.security.client_ip import in_networks, parse_address, parse_networks
from serve_app.security.redis_store import STORE_ERRORS, StoreHealth, load_script
from serve_app.settings import AbuseOptions

logger = logging.getLogger(__name__)

AbuseEvent = Literal["auth_failure", "rejected_upload", "malware", "rate_limited"]
ABUSE_EVENTS: tuple[str, ...] = get_args(AbuseEvent)

KEY_PREFIX = "abuse"


@dataclass(frozen=True)
class Ban:
    subject: str  # "ip:203.0.113.7" or "principal:api_key:k_123"
    reason: str  # the event that crossed its threshold
    offence: int  # 1 for a first ban, n for the n-th within the offence memory
    duration_s: int  # how long it was imposed for
    retry_after_s: int  # how long it still runs


def ip_subject(ip: str) -> str:
    return f"ip:{ip}"


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
            "rejected_upload": options.max_rejected_uploads,
            "malware": options.max_malware_hits,
            "rate_limited": options.max_rate_limit_hits,
        }

    async def is_banned(self, ip: str, principal_key: str | None = None) -> Ban | None:
        """The ban (the longer-running, if both are banned) on this IP or principal; one round trip."""
        subjects = self._subjects(ip, principal_key)
        if not subjects:
            return None
        try:
            async with self._redis.pipeline(transaction=False) as pipeline:
                for subject in subjects:
                    pipeline.get(_ban_key(subject)).pttl(_ban_key(subject))
                replies = await pipeline.execute()
        except STORE_ERRORS as error:
            self.store_health.failed(error, "nobody is treated as banned (fail open)")
            return None
        self.store_health.answered()
        bans = [_ban(subject, value, ttl_ms) for subject, value, ttl_ms in zip(subjects, replies[::2], replies[1::2])]
        return max((ban for ban in bans if ban), key=lambda ban: ban.retry_after_s, default=None)

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
        """End a subject's ban and forget its offences and pending events; False if it was not banned."""
        if not subject.startswith(("ip:", "principal:")):
            raise ValueError("a subject is 'ip:<address>' or 'principal:<principal key>'")
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
