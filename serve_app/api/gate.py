"""The ingress's security decisions, one method per step of the request path.

    admit()          client IP (trusted proxies only), IP ban and pre-authentication IP bucket
    authenticate()   credential -> Principal, scope, load shedding, IP and principal bans and request bucket
    concurrency_slot() one of the principal's concurrent requests, shared by all replicas
    charge_audio()   decoded audio seconds against the principal's audio bucket, once the request
                     is known to be servable; refund_audio() gives them back when the work then
                     fails on our side
    upload_refused() audit a refused upload; count it toward bans only if hostile (abuse.refusal_event)

Each step turns its decision into a problem (4xx/503), a metric and an audit line; the modules it
composes (serve_app.security.*) know nothing of HTTP. Bans are read in the round trip of the
bucket decision that follows them (one Redis call each, bench.request_cost), and a banned caller's
take charges nothing. One Gate per ingress replica: it owns the
replica's Redis client and the verifiers' caches.

Failure policy when Redis is down:
- authentication (API keys): keys Redis confirmed within `api_key_stale_s` keep working from the
  replica's stale copy, counted as aligner_api_key_stale_serves and audited (`stale_s`); every
  other key fails CLOSED, 503 + Retry-After, aligner_dependency_errors{redis,auth};
- rate limits: fail OPEN by default (RateLimitOptions.fail_open), counted as
  aligner_ratelimit_decisions{result="error_allowed"}; the per-replica concurrency cap still holds;
- the per-principal concurrency cap: fail OPEN, always (counted the same way, policy "concurrency"),
  leaving the per-replica cap as the bound;
- bans: not enforced while Redis is down (counted with the rate-limit decision they ride on),
  enforced again when it is back.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import httpx
from fastapi import Request

from serve_app import metrics
from serve_app.problems import Problem
from serve_app.security.abuse import AbuseEvent, AbuseMonitor, Ban, refusal_event
from serve_app.security.api_keys import ApiKeyStore, ApiKeyVerifier
from serve_app.security.audit import AuditContext, AuditLog
from serve_app.security.authenticate import AuthFailure, Authenticator, www_authenticate
from serve_app.security.client_ip import client_ip
from serve_app.security.oauth import JwtVerifier
from serve_app.security.principal import Principal
from serve_app.security.principal_concurrency import ConcurrencyLimitReached, PrincipalConcurrency
from serve_app.security.ratelimit import Decision, RateLimiter, TokenBucketLimiter, principal_key
from serve_app.security.redis_store import request_path_client
from serve_app.security.shedding import LoadShedder
from serve_app.settings import Environment, IngressOptions, Plan

logger = logging.getLogger("ray.serve")

_AUTH_PROBLEMS = {400: "invalid-request", 401: "unauthenticated", 403: "insufficient-scope", 503: "service-unavailable"}
CONCURRENCY_POLICY = "concurrency"


@dataclass
class Caller:
    """Who is calling and what they were granted, for one request."""

    request_id: str
    client_ip: str
    route: str
    principal: Principal | None = None
    decisions: dict[str, Decision] = field(default_factory=dict)  # latest per policy: response headers

    @property
    def audit(self) -> AuditContext:
        return AuditContext(self.request_id, self.client_ip, self.route, self.principal.id if self.principal else None)

    @property
    def principal_key(self) -> str | None:
        return principal_key(self.principal) if self.principal else None


class Gate:
    def __init__(self, environment: Environment, options: IngressOptions, audit: AuditLog) -> None:
        if environment.api_key_pepper is None:
            raise RuntimeError("ALIGNER_API_KEY_PEPPER (or ALIGNER_API_KEY_PEPPER_FILE) must be set")
        self.redis = request_path_client(
            environment.redis_url.get_secret_value(), timeout_s=options.rate_limits.redis_timeout_s, sentinel=environment.redis_sentinel
        )
        self.api_keys = ApiKeyStore(
            self.redis, environment.api_key_pepper.get_secret_value().encode(), options.api_key_last_used_flush_s
        )
        self.http = httpx.AsyncClient()  # JWKS, metadata and introspection fetches
        self.limiter = RateLimiter(TokenBucketLimiter(self.redis), options.rate_limits, unavailable_retry_after_s=options.retry_after_s)
        self.abuse = AbuseMonitor(self.redis, options.abuse)
        self.shedder = LoadShedder(options.shedding)
        self.concurrency = PrincipalConcurrency(self.redis, options.rate_limits.concurrency_lease_s)
        self.audit = audit
        self._introspection_secret = environment.introspection_client_secret
        self._oauth: object = None  # the settings each verifier was built from (None: not yet)
        self._api_key_bounds: tuple[float, float] | None = None
        self.reconfigure(options)

    def reconfigure(self, options: IngressOptions) -> None:
        """Apply every live setting (the start-only ones say so in serve_app.settings)."""
        self.options = options
        self.limiter.reconfigure(options.rate_limits, unavailable_retry_after_s=options.retry_after_s)
        self.abuse.reconfigure(options.abuse)
        self.shedder.options = options.shedding
        self.concurrency.lease_s = options.rate_limits.concurrency_lease_s
        # Each verifier is rebuilt only when its own settings change: rebuilding drops its cache.
        rebuild = False
        api_key_bounds = (options.api_key_cache_s, options.api_key_stale_s)
        if api_key_bounds != self._api_key_bounds:
            self._api_key_bounds = api_key_bounds
            self._api_key_verifier = ApiKeyVerifier(self.api_keys, *api_key_bounds)
            rebuild = True
        if options.oauth != self._oauth:
            self._oauth = options.oauth
            secret = self._introspection_secret.get_secret_value() if self._introspection_secret else None
            self._jwt_verifier = JwtVerifier(options.oauth, self.http, secret) if options.oauth.issuers else None
            rebuild = True
        if rebuild:
            self.authenticator = Authenticator(self._api_key_verifier, self._jwt_verifier)

    # -- 1-2: before any credential is looked at ------------------------------------------------

    async def admit(self, request: Request, route: str) -> Caller:
        peer = request.client.host if request.client else "0.0.0.0"
        caller = Caller(
            request_id=request.state.request_id,
            client_ip=client_ip(peer, request.headers.getlist("x-forwarded-for"), self.options.trusted_proxies),
            route=route,
        )
        request.state.caller = caller  # before any refusal: a pre-auth 429 carries the RateLimit headers too
        bans = self.abuse.ban_check(caller.client_ip)  # read with the bucket, in its round trip
        with metrics.timed("limit"):
            decision = await self.limiter.take_pre_auth(caller.client_ip, load_factor=self.shedder.load_factor, blockers=bans.keys)
        self._refuse_if_banned(caller, self.abuse.ban_found(bans, decision.blocked_by))
        await self._enforce(caller, decision)
        return caller

    # -- 3-5: who, may they, and is there room ---------------------------------------------------

    async def authenticate(self, request: Request, caller: Caller, scope: str) -> Principal:
        with metrics.timed("auth"):
            try:
                principal = caller.principal = await self.authenticator.authenticate(request.headers)
                self.authenticator.authorize(principal, scope)  # a 403 is audited with who asked
            except AuthFailure as failure:
                await self._auth_failed(caller, failure)
        if principal.stale_s is not None:
            metrics.API_KEY_STALE_SERVES.inc()
        self.audit.record(
            caller.audit, "auth", "allowed", "authenticated", method=principal.method, plan=principal.plan, issuer=principal.issuer,
            stale_s=None if principal.stale_s is None else round(principal.stale_s, 1),
        )  # fmt: skip

        plan = self._plan(principal)
        if self.shedder.should_shed(plan.priority):
            metrics.SHED.inc(tags={"plan": principal.plan})
            self.audit.record(caller.audit, "shed", "denied", "load", load_level=round(self.shedder.level, 3))
            raise Problem(
                "temporary-reduced-capacity",
                "the service is shedding load; retry later",
                headers={"Retry-After": str(self.options.retry_after_s)},
            )
        bans = self.abuse.ban_check(caller.client_ip, caller.principal_key)  # the principal may be banned now
        with metrics.timed("limit"):
            decision = await self.limiter.take_request(principal, plan, load_factor=self.shedder.load_factor, blockers=bans.keys)
        self._refuse_if_banned(caller, self.abuse.ban_found(bans, decision.blocked_by))
        await self._enforce(caller, decision)
        return principal

    # -- 6: room for one more of this principal's requests --------------------------------------

    @asynccontextmanager
    async def concurrency_slot(self, caller: Caller) -> AsyncIterator[None]:
        """Hold one of the plan's `max_concurrent_requests` (all replicas together) for the body.

        Full is the principal's own doing, so it is a 429 quota answer, not a 503: other callers
        are unaffected, and the client should finish what it has in flight before sending more.
        """
        assert caller.principal is not None
        limit = self._plan(caller.principal).max_concurrent_requests
        try:
            async with self.concurrency.slot(principal_key(caller.principal), limit) as shared:
                metrics.RATELIMIT_DECISIONS.inc(tags={"policy": CONCURRENCY_POLICY, "result": "allowed" if shared else "error_allowed"})
                yield
        except ConcurrencyLimitReached:
            metrics.RATELIMIT_DECISIONS.inc(tags={"policy": CONCURRENCY_POLICY, "result": "denied"})
            self.audit.record(caller.audit, "limit", "denied", CONCURRENCY_POLICY, limit=limit)
            raise Problem(
                "quota-exceeded",
                f"{limit} requests of this principal are already in flight; retry when one has finished",
                headers={"Retry-After": str(self.options.retry_after_s)},
                extensions={"violated-policies": [CONCURRENCY_POLICY]},
            ) from None

    async def close(self) -> None:
        await self.api_keys.flush_last_used()
        await self.http.aclose()
        await self.redis.aclose()

    async def _auth_failed(self, caller: Caller, failure: AuthFailure) -> None:
        metrics.AUTH_FAILURES.inc(tags={"method": failure.method or "none", "reason": failure.reason})
        self.audit.record(caller.audit, "auth", "denied", failure.reason, method=failure.method, status=failure.status)
        headers: dict[str, str] = {}
        if failure.status == 503:
            metrics.DEPENDENCY_ERRORS.inc(tags={"dependency": "redis" if failure.method == "api_key" else "issuer", "use": "auth"})
            headers["Retry-After"] = str(self.options.retry_after_s)
        else:
            headers["WWW-Authenticate"] = www_authenticate(failure)
        if failure.status in (400, 401):
            # Counted by IP only: key ids are not secret, so counting failures against a claimed id
            # would let anyone get someone else's key banned.
            await self._record(caller, "auth_failure", by_principal=False)
        raise Problem(_AUTH_PROBLEMS[failure.status], failure.description, headers=headers)

    # -- 7: after the scanner ---------------------------------------------------------------------

    async def charge_audio(self, caller: Caller, decoded_seconds: float) -> None:
        assert caller.principal is not None
        plan = self._plan(caller.principal)
        with metrics.timed("limit"):
            decision = await self.limiter.take_audio_seconds(
                caller.principal, plan, decoded_seconds, load_factor=self.shedder.load_factor
            )
        await self._enforce(caller, decision, decoded_seconds=round(decoded_seconds, 3))

    async def refund_audio(self, caller: Caller, charged_seconds: float) -> None:
        """Give back seconds charged for an alignment that failed on our side (a 5xx answer).

        Best effort: with Redis down the refund is lost, counted and audited, and the answer the
        caller gets is unchanged.
        """
        assert caller.principal is not None
        plan = self._plan(caller.principal)
        decision = await self.limiter.refund_audio_seconds(
            caller.principal, plan, charged_seconds, load_factor=self.shedder.load_factor
        )
        result = "refund_failed" if decision.store_error else "refunded"
        metrics.RATELIMIT_DECISIONS.inc(tags={"policy": decision.policy, "result": result})
        self.audit.record(caller.audit, "limit", result, decision.policy, decoded_seconds=round(charged_seconds, 3))
        if not decision.store_error:
            caller.decisions[decision.policy] = decision

    def longest_audio_seconds(self, caller: Caller) -> float:
        """The longest decoded audio this caller's plan admits (IngressOptions validates it fits the bucket)."""
        assert caller.principal is not None
        return self.options.longest_audio_seconds(self._plan(caller.principal))

    def plan_of(self, caller: Caller) -> Plan:
        assert caller.principal is not None
        return self._plan(caller.principal)

    def _plan(self, principal: Principal) -> Plan:
        return self.options.plans.get(principal.plan, self.options.plans["standard"])

    async def upload_refused(self, caller: Caller, slug: str, signature: str | None = None) -> None:
        self.audit.record(caller.audit, "scan", "denied", slug, signature=signature)
        event = refusal_event(slug)
        if event is not None:
            await self._record(caller, event, by_principal=True)

    # -- shared ------------------------------------------------------------------------------------

    async def _enforce(self, caller: Caller, decision: Decision, **numbers: float) -> None:
        result = "error_allowed" if decision.error_allowed else ("allowed" if decision.allowed else ("error_denied" if decision.store_error else "denied"))
        metrics.RATELIMIT_DECISIONS.inc(tags={"policy": decision.policy, "result": result})
        if not decision.store_error:
            caller.decisions[decision.policy] = decision
        if decision.allowed:
            return
        self.audit.record(caller.audit, "limit", "denied", decision.policy, remaining=decision.remaining, limit=decision.limit, **numbers)
        if decision.store_error:
            raise Problem("service-unavailable", "rate limiting is unavailable; retry later", headers={"Retry-After": str(self.options.retry_after_s)})
        await self._record(caller, "rate_limited", by_principal=True)
        raise Problem(
            "quota-exceeded",
            f"the {decision.policy} quota is exhausted; retry after the Retry-After delay",
            extensions={"violated-policies": [decision.policy]},
        )

    def _refuse_if_banned(self, caller: Caller, ban: Ban | None) -> None:
        if ban is None:
            return
        metrics.BANS.inc(tags={"subject": ban.subject.split(":", 1)[0], "action": "enforced"})
        self.audit.record(caller.audit, "ban", "denied", ban.reason, retry_after_s=ban.retry_after_s, offence=ban.offence)
        raise Problem(
            "abnormal-usage-detected",
            "requests from this client are temporarily refused after abnormal usage",
            headers={"Retry-After": str(ban.retry_after_s)},
        )

    async def _record(self, caller: Caller, event: AbuseEvent, *, by_principal: bool) -> None:
        bans = await self.abuse.record(event, caller.client_ip, caller.principal_key if by_principal else None)
        for ban in bans:
            metrics.BANS.inc(tags={"subject": ban.subject.split(":", 1)[0], "action": "imposed"})
            self.audit.record(caller.audit, "ban", "imposed", ban.reason, duration_s=ban.duration_s, offence=ban.offence)


@dataclass(frozen=True)
class CallerLedger:
    """One caller's quota and audit trail, as the alignment pipeline sees them (serve_app.pipeline.alignment.Ledger)."""

    gate: Gate
    caller: Caller

    async def charge_audio(self, seconds: float) -> None:
        await self.gate.charge_audio(self.caller, seconds)

    async def refund_audio(self, seconds: float) -> None:
        await self.gate.refund_audio(self.caller, seconds)

    async def upload_refused(self, reason: str, signature: str | None) -> None:
        await self.gate.upload_refused(self.caller, reason, signature)

    def scan_recorded(self, outcome: str, reason: str, **fields: object) -> None:
        self.gate.audit.record(self.caller.audit, "scan", outcome, reason, **fields)
