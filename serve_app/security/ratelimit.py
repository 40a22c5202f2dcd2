"""Rate limits: token buckets in Redis (the algorithm) and the service's policies on top.

- `TokenBucketLimiter`: one atomic Lua script (token_bucket.lua) per decision, timed by the Redis
  server's clock; it knows nothing of principals or plans. A decision can also read keys that
  block it while they exist (`blockers`: the caller's bans, serve_app.security.abuse), in the same
  round trip: a blocked take charges nothing.
- `RateLimiter`: the three policies, each a named bucket:
    "pre-auth"       per client address block (client_ip.address_block: IPv4 address, IPv6 /64),
                     before credentials are checked (RateLimitOptions.pre_auth_*);
    "requests"       per principal, from its Plan;
    "audio-seconds"  per principal, from its Plan, charged the *decoded* duration once the scanner
                     has decoded the upload and before the aligner runs (an upload's headers can
                     lie about its duration; the decoder cannot). Overdrawing is refused and
                     charges nothing; seconds charged for work that was then not done (the
                     aligner failed on our side) are refunded, never beyond the capacity.
  Under load the shedder's `load_factor` in (0, 1] scales a bucket's capacity *and* refill, so
  burst and sustained rate shrink together and the advertised window stays the same.
  It also owns the replica's local concurrency cap (`local_slot()`), which never touches Redis.

Failure behaviour: when Redis fails, a decision is admitted (`fail_open`, the default, as Envoy,
Kong and Stripe do) or refused, with `store_error` set either way; a refusal for that reason is a
503, not a 429. `store_health.failures` counts every such decision; the first failure after a
healthy spell and the recovery are logged once each, not per request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from redis.asyncio import Redis

from serve_app.security.client_ip import address_block
from serve_app.security.concurrency import ConcurrencyCap
from serve_app.security.principal import Principal
from serve_app.security.redis_store import STORE_ERRORS, StoreHealth, load_script
from serve_app.settings import Plan, RateLimitOptions

logger = logging.getLogger(__name__)

PRE_AUTH_POLICY = "pre-auth"
REQUESTS_POLICY = "requests"
AUDIO_SECONDS_POLICY = "audio-seconds"
KEY_PREFIX = "ratelimit"


@dataclass(frozen=True)
class Decision:
    """The outcome of one take on one bucket; what the headers and the problem document report."""

    policy: str
    key: str  # whose bucket: "ip:203.0.113.7", "ip:2001:db8::/64", "api_key:k_123"; never a secret
    allowed: bool
    limit: float  # capacity in force (after the load factor)
    window_s: float  # time for an empty bucket to fill: the policy's window
    remaining: float  # tokens left after this decision
    retry_after_s: float  # when denied: until the cost would fit; 0 when allowed
    reset_s: float  # until the bucket is full again
    store_error: bool = False  # Redis failed: `allowed` is the configured failure mode, the rest unknown
    # What each blocking key held: (value or None, PTTL in ms), in the order asked; () when Redis failed.
    blocked_by: tuple[tuple[str | None, int], ...] = ()

    @property
    def error_allowed(self) -> bool:
        """Admitted only because Redis failed and the limiter fails open."""
        return self.allowed and self.store_error


class TokenBucketLimiter:
    """Token buckets stored in Redis; each `take` is one EVALSHA round trip."""

    def __init__(self, redis: Redis):
        self._script = load_script(redis, "token_bucket.lua")

    async def take(
        self,
        key: str,
        capacity: float,
        refill_per_s: float,
        cost: float = 1.0,
        *,
        policy: str = "default",
        charge: bool = True,
        blockers: Sequence[str] = (),
    ) -> Decision:
        """Take `cost` tokens from `policy`'s bucket for `key`, or none if they are not all there.

        A negative `cost` gives tokens back (a refund), never beyond `capacity`; it is always allowed.
        `charge=False` only asks whether `cost` would be admitted now, and writes nothing; neither
        does a take while any of the `blockers` keys exists (their contents: `blocked_by`).
        Raises a redis error when the store fails; policy on failure belongs to the caller.
        """
        if capacity <= 0 or refill_per_s <= 0:
            raise ValueError("capacity and refill must be positive")
        allowed, remaining, retry_after_s, reset_s, *read = await self._script(
            keys=[f"{KEY_PREFIX}:{policy}:{key}", *blockers], args=[capacity, refill_per_s, cost, int(charge)]
        )
        return Decision(
            policy=policy,
            key=key,
            allowed=bool(int(allowed)),
            limit=capacity,
            window_s=capacity / refill_per_s,
            remaining=float(remaining),
            retry_after_s=float(retry_after_s),
            reset_s=float(reset_s),
            blocked_by=tuple(zip(read[::2], (int(ttl_ms) for ttl_ms in read[1::2]))),
        )


def principal_key(principal: Principal) -> str:
    """Whose buckets and bans: "api_key:<key id>" or "jwt:<issuer tag>:<client id>".

    API key ids and OAuth client ids live in separate namespaces, and so does each issuer's: two
    issuers may both have a client "batch-worker", and they are different callers. The issuer
    enters as a fixed-length hash (see Principal.issuer_tag), so no issuer URL or client id can
    forge another's key, and the key stays short and safe in a URL path (DELETE /v1/admin/bans/...).
    API-key principals' keys are unchanged, so their existing buckets and bans keep applying.
    """
    if principal.method == "jwt":
        return f"jwt:{principal.issuer_tag}:{principal.id}"
    return f"{principal.method}:{principal.id}"


class RateLimiter:
    """The service's rate-limit policies, and what happens when Redis is away."""

    def __init__(self, limiter: TokenBucketLimiter, options: RateLimitOptions, *, unavailable_retry_after_s: int = 5):
        self._limiter = limiter
        self._options = options
        self._unavailable_retry_after_s = unavailable_retry_after_s
        self._local = ConcurrencyCap(options.local_max_concurrency)
        self.store_health = StoreHealth(logger, "rate limiter")  # .failures: decisions made without Redis

    def reconfigure(self, options: RateLimitOptions, *, unavailable_retry_after_s: int = 5) -> None:
        self._options = options
        self._unavailable_retry_after_s = unavailable_retry_after_s
        self._local.resize(options.local_max_concurrency)

    def local_slot(self) -> AbstractAsyncContextManager[None]:
        """`async with limiter.local_slot():` around the request; raises ConcurrencyCapReached when full."""
        return self._local.slot()

    @property
    def local_cap(self) -> ConcurrencyCap:
        return self._local

    async def take_pre_auth(self, client_ip: str, *, load_factor: float = 1.0, blockers: Sequence[str] = ()) -> Decision:
        """One request from `client_ip`, before its credentials are checked (none while a `blockers` key exists)."""
        options = self._options
        return await self._take(
            PRE_AUTH_POLICY, f"ip:{address_block(client_ip)}", options.pre_auth_burst, options.pre_auth_per_minute / 60, 1.0,
            load_factor, blockers=blockers,
        )  # fmt: skip

    async def take_request(self, principal: Principal, plan: Plan, *, load_factor: float = 1.0, blockers: Sequence[str] = ()) -> Decision:
        """One request by an authenticated principal (none while a `blockers` key exists)."""
        return await self._take(
            REQUESTS_POLICY, principal_key(principal), plan.requests_burst, plan.requests_per_minute / 60, 1.0, load_factor,
            blockers=blockers,
        )  # fmt: skip

    async def take_audio_seconds(
        self, principal: Principal, plan: Plan, decoded_seconds: float, *, load_factor: float = 1.0
    ) -> Decision:
        """Charge the decoded duration; refused (and nothing charged) if it would overdraw."""
        return await self._take(AUDIO_SECONDS_POLICY, principal_key(principal), *_audio_bucket(plan), decoded_seconds, load_factor)

    async def refund_audio_seconds(
        self, principal: Principal, plan: Plan, charged_seconds: float, *, load_factor: float = 1.0
    ) -> Decision:
        """Give back seconds charged for work that was not done; the bucket never passes its capacity."""
        if charged_seconds < 0:
            raise ValueError("charged_seconds must be non-negative")
        return await self._take(
            AUDIO_SECONDS_POLICY, principal_key(principal), *_audio_bucket(plan), -charged_seconds, load_factor
        )

    async def has_audio_seconds(
        self, principal: Principal, plan: Plan, seconds: float = 1.0, *, load_factor: float = 1.0
    ) -> Decision:
        """Whether `seconds` could be charged now, charging nothing: lets the ingress refuse an
        upload before paying for its scan when the principal's audio budget is already spent."""
        return await self._take(
            AUDIO_SECONDS_POLICY, principal_key(principal), *_audio_bucket(plan), seconds, load_factor, charge=False
        )

    async def _take(
        self,
        policy: str,
        key: str,
        capacity: float,
        refill_per_s: float,
        cost: float,
        load_factor: float,
        *,
        charge: bool = True,
        blockers: Sequence[str] = (),
    ) -> Decision:
        if not 0 < load_factor <= 1:
            raise ValueError("load_factor must be in (0, 1]")
        try:
            decision = await self._limiter.take(
                key, capacity * load_factor, refill_per_s * load_factor, cost, policy=policy, charge=charge, blockers=blockers
            )
        except STORE_ERRORS as error:
            return self._store_failed(policy, key, capacity * load_factor, capacity / refill_per_s, error)
        self.store_health.answered()
        return decision

    def _store_failed(self, policy: str, key: str, limit: float, window_s: float, error: Exception) -> Decision:
        allowed = self._options.fail_open
        self.store_health.failed(error, "admitting requests (fail open)" if allowed else "refusing requests (fail closed)")
        return Decision(
            policy=policy,
            key=key,
            allowed=allowed,
            limit=limit,
            window_s=window_s,
            remaining=0.0,
            retry_after_s=0.0 if allowed else float(self._unavailable_retry_after_s),
            reset_s=0.0,
            store_error=True,
        )


def _audio_bucket(plan: Plan) -> tuple[float, float]:
    """(capacity, refill per second) of a plan's audio-seconds bucket."""
    return plan.audio_seconds_burst, plan.audio_seconds_per_hour / 3600
