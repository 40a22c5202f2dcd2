"""The single source of configuration, in three typed parts.

- `GraphArgs`: the builder's arguments (`applications[].args` in configs/serve.yaml). Structure that
  needs a redeploy to change: which aligner backend, which model, on which device.
- `IngressOptions`, `ScannerOptions`, `AlignerOptions`: each deployment's `user_config`. Live knobs
  (caps, batch size) applied by `reconfigure()` without restarting replicas.
- `Environment`: where the service's dependencies are and the secrets, read from the process
  environment once (`Environment.from_env()`); never from the YAML, never logged. This module is
  the only one that reads the environment.

Every model forbids unknown keys, so a typo in the YAML fails the deploy instead of silently
falling back to a default, and checks its fields against each other (a setting that is valid alone
but not with another fails the deploy, not the first request under load).

Live or start-only: every `user_config` field is applied by the deployment's `reconfigure()`
without a restart, except those whose description begins with "Start-only", which are read when a
replica starts (change them with a redeploy that replaces the replicas). tests/test_settings.py
holds the list and docs/operations.md repeats it.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from serve_app.text.languages import canonical_language


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _valid_networks(networks: list[str]) -> list[str]:
    for network in networks:
        ipaddress.ip_network(network, strict=False)  # ValueError -> a validation error naming it
    return networks


class GraphArgs(_Strict):
    """Builder arguments: the shape of the graph and the model behind it."""

    backend: Literal["auto", "qwen3", "pocketsphinx"] = Field(
        "auto",
        description="qwen3: must load or the deploy fails. pocketsphinx: offline English. "
        "auto: qwen3 when its weights load, otherwise pocketsphinx (logged loudly).",
    )
    qwen3_model: str = Field("Qwen/Qwen3-ForcedAligner-0.6B", description="Hub id or local directory.")
    qwen3_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    qwen3_device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    qwen3_max_audio_seconds: float = Field(
        180.0, gt=0, le=300, description="Longer audio is rejected (the model is unreliable past ~300 s)."
    )
    windows_in_child_process: bool = Field(
        True, description="PocketSphinx: job windows are aligned by a second backend in a child process at a lower "
        "CPU priority, beside requests' batches instead of ahead of them (Qwen3 keeps one lane: one model per GPU).",
    )


class Plan(_Strict):
    """A rate-limit plan: token buckets for requests and for decoded audio seconds."""

    requests_burst: int = Field(60, ge=1, description="Request bucket capacity.")
    requests_per_minute: float = Field(60.0, gt=0, description="Request bucket refill.")
    audio_seconds_burst: float = Field(1800.0, gt=0, description="Audio-seconds bucket capacity.")
    audio_seconds_per_hour: float = Field(3600.0, gt=0, description="Audio-seconds bucket refill.")
    max_audio_seconds: float | None = Field(
        None, gt=0, description="Longest single upload on this plan (decoded); default the ingress's max_audio_seconds."
    )
    priority: int = Field(0, ge=0, le=10, description="Under load, lower priorities are shed first.")
    max_concurrent_requests: int = Field(
        4, ge=1, description="Align requests one principal may have in flight, across all ingress replicas (429 beyond)."
    )
    max_active_jobs: int = Field(20, ge=1, description="Jobs one principal may have queued or running at once (429 beyond).")


def _default_plans() -> dict[str, Plan]:
    return {
        "standard": Plan(),
        "premium": Plan(requests_burst=300, requests_per_minute=600, audio_seconds_burst=18000, audio_seconds_per_hour=36000, priority=5, max_concurrent_requests=12),
    }


class OAuthIssuer(_Strict):
    """One trusted OAuth2 authorization server issuing RFC 9068 JWT access tokens."""

    issuer: str = Field(description="Exact `iss` value; also the base for RFC 8414 / OIDC discovery.")
    audience: str = Field(description="Our resource identifier: tokens' `aud` must contain it.")
    jwks_uri: str | None = Field(None, description="Skips discovery when set.")
    algorithms: list[Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]] = ["RS256"]
    require_at_jwt_typ: bool = Field(True, description="Reject tokens whose `typ` is not at+jwt (switch off for issuers that omit it).")
    plan_by_client: dict[str, str] = Field(default_factory=dict, description="client_id -> plan name.")
    default_plan: str = "standard"
    introspection_endpoint: str | None = Field(None, description="RFC 7662, for opaque (non-JWT) tokens.")
    introspection_client_id: str | None = None  # its secret: ALIGNER_INTROSPECTION_CLIENT_SECRET


class OAuthOptions(_Strict):
    issuers: list[OAuthIssuer] = Field(default_factory=list)
    leeway_s: int = Field(30, ge=0, le=300, description="Clock skew allowed on exp/nbf/iat.")
    jwks_min_cache_s: float = Field(60, ge=0, description="Lower bound on honouring Cache-Control.")
    jwks_max_cache_s: float = Field(3600, gt=0, description="Upper bound on honouring Cache-Control.")
    jwks_refetch_interval_s: float = Field(30, ge=0, description="Unknown kid: re-fetch at most this often.")
    http_timeout_s: float = Field(3.0, gt=0)

    @model_validator(mode="after")
    def _cache_bounds_ordered(self) -> "OAuthOptions":
        if self.jwks_min_cache_s > self.jwks_max_cache_s:
            raise ValueError("jwks_min_cache_s must be <= jwks_max_cache_s")
        return self


class RateLimitOptions(_Strict):
    fail_open: bool = Field(True, description="Redis down: admit (counted) rather than refuse.")
    pre_auth_burst: int = Field(120, ge=1, description="Per client IP, before credentials are checked.")
    pre_auth_per_minute: float = Field(600, gt=0)
    local_max_concurrency: int = Field(16, ge=1, description="Per ingress replica; never depends on Redis.")
    redis_timeout_s: float = Field(
        0.25, gt=0, le=5, description="Start-only (the replica's Redis client is built with it): per Redis call on the request path."
    )
    concurrency_lease_s: float = Field(
        30.0, ge=1, le=300, description="A principal's concurrency lease outlives a dead replica by at most this; renewed while held."
    )


class SheddingOptions(_Strict):
    """When to shrink buckets and shed new work, from the aligner's and scanner's load."""

    reduce_above: float = Field(0.7, ge=0, lt=1, description="Load level above which bucket capacities shrink (below 1, the level of full capacity).")
    min_load_factor: float = Field(0.25, gt=0, le=1, description="Bucket capacity multiplier at level 1 and above.")
    shed_above: float = Field(0.9, gt=0, description="Level at which priority-0 work is shed.")
    shed_top_priority_above: float = Field(1.5, gt=0, description="Level at which priority-10 work is shed.")
    target_batch_wait_s: float = Field(0.5, gt=0, description="A batch wait this long counts as level 1.")
    max_sample_age_s: float = Field(5.0, gt=0, description="Older samples mean load unknown: shed nothing.")
    sample_interval_s: float = Field(1.0, gt=0, description="How often the load is probed; also how long a probe may take.")

    @model_validator(mode="after")
    def _consistent(self) -> "SheddingOptions":
        if self.shed_above > self.shed_top_priority_above:
            raise ValueError("shed_above must be <= shed_top_priority_above: higher priorities are shed later, not sooner")
        if self.max_sample_age_s <= self.sample_interval_s:
            raise ValueError("max_sample_age_s must exceed sample_interval_s, or every sample is stale and nothing is ever shed")
        return self


class AbuseOptions(_Strict):
    window_s: int = Field(60, ge=1)
    max_auth_failures: int = Field(20, ge=1)
    max_malware_hits: int = Field(3, ge=1, description="Detections in the window that ban; one alone never does (false positives).")
    max_rate_limit_hits: int = Field(100, ge=1)
    ban_s: int = Field(300, ge=1, description="First ban; each repeat doubles it.")
    max_ban_s: int = Field(86400, ge=1)
    offence_memory_s: int = Field(86400, ge=1, description="A new offence this long after a ban still doubles the next.")
    allow_networks: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        return _valid_networks(networks)

    @model_validator(mode="after")
    def _ban_bounds_ordered(self) -> "AbuseOptions":
        if self.ban_s > self.max_ban_s:
            raise ValueError("ban_s must be <= max_ban_s")
        return self


class LongFormLimits(_Strict):
    """What one long-form request may hold (the asynchronous job API applies these)."""

    max_upload_bytes: int = Field(2 * 1024**3, gt=0, description="Whole upload (2 GiB).")
    max_audio_seconds: float = Field(36_000.0, gt=0, description="Longest decoded audio (10 h); a plan's max_audio_seconds may lower it.")
    max_transcript_chars: int = Field(700_000, gt=0)
    max_transcript_units: int = Field(150_000, gt=0, description="Alignment units (10 h at 4 words a second is 144k).")


class JobOptions(_Strict):
    """The asynchronous job API (POST /v1/jobs): what a job may hold is `long_form`."""

    retention_s: float = Field(86_400.0, gt=0, le=30 * 86_400, description="How long an ended job and its result are kept (then 404).")
    max_page_size: int = Field(100, ge=1, le=1000, description="Most jobs one GET /v1/jobs page lists.")


class IngressOptions(_Strict):
    """Live knobs of the ingress: what a request may contain, who may call, how often."""

    # 30 min of 16 kHz 16-bit mono WAV is 57.6 MB; the rest is room for the transcript and the form.
    max_upload_bytes: int = Field(64 * 1024 * 1024, gt=0, description="Whole multipart body of POST /v1/align.")
    upload_idle_timeout_s: float = Field(10.0, gt=0, le=300, description="Longest silence inside a body (408 past it).")
    upload_min_bytes_per_s: float = Field(8192.0, ge=0, description="Average body rate required after the grace period (408 below).")
    upload_rate_grace_s: float = Field(10.0, ge=0, description="Time a body may take before its average rate is checked.")
    max_transcript_chars: int = Field(100_000, gt=0, description="Transcript of POST /v1/align.")
    max_transcript_units: int = Field(20_000, gt=0, description="Alignment units (words, CJK characters) of POST /v1/align.")
    default_language: str = Field("English", description="Used when a request names no language.")
    max_audio_seconds: float = Field(
        1800.0, gt=0, description="Longest decoded audio POST /v1/align admits (longer files are windowed across "
        "aligner jobs); every plan's audio_seconds_burst must hold it."
    )
    long_form: LongFormLimits = Field(default_factory=LongFormLimits)
    jobs: JobOptions = Field(default_factory=JobOptions)
    scan_timeout_s: float = Field(30.0, gt=0, description="Bound on one scan, plus the upload's size over scan_min_bytes_per_s.")
    scan_min_bytes_per_s: float = Field(
        4 * 1024 * 1024, gt=0, description="Scanning (clamd, decoding) throughput a large upload is allowed for."
    )
    align_timeout_s: float = Field(120.0, gt=0, description="Bound on one aligner job (a long file's window).")
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 503 answers.")
    api_key_cache_s: float = Field(5.0, ge=0, le=60, description="Bound on how long a revoked key keeps working.")
    api_key_stale_s: float = Field(
        600.0,
        ge=0,
        le=86400,
        description="Redis unreachable: a key Redis confirmed within this long keeps working from the "
        "replica's stale copy (0: fail closed at once). Keys never seen, or confirmed longer ago, get 503.",
    )
    api_key_last_used_flush_s: float = Field(
        60.0, gt=0, description="Start-only: last-used times are written behind, this often."
    )
    trusted_proxies: list[str] = Field(default_factory=list, description="Peers whose X-Forwarded-For is believed.")
    plans: dict[str, Plan] = Field(default_factory=_default_plans)
    oauth: OAuthOptions = Field(default_factory=OAuthOptions)
    rate_limits: RateLimitOptions = Field(default_factory=RateLimitOptions)
    abuse: AbuseOptions = Field(default_factory=AbuseOptions)
    shedding: SheddingOptions = Field(default_factory=SheddingOptions)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, networks: list[str]) -> list[str]:
        return _valid_networks(networks)

    @field_validator("default_language")
    @classmethod
    def _known_language(cls, value: str) -> str:
        canonical = canonical_language(value)
        if canonical is None:
            raise ValueError(f"unsupported default_language {value!r}")
        return canonical

    @model_validator(mode="after")
    def _plans_exist(self) -> "IngressOptions":
        named = {issuer.default_plan for issuer in self.oauth.issuers}
        named |= {plan for issuer in self.oauth.issuers for plan in issuer.plan_by_client.values()}
        missing = named - set(self.plans)
        if missing or "standard" not in self.plans:
            raise ValueError(f"unknown plan(s): {sorted(missing or {'standard'})}")
        return self

    def scan_timeout_for(self, upload_bytes: int) -> float:
        return self.scan_timeout_s + upload_bytes / self.scan_min_bytes_per_s

    def longest_audio_seconds(self, plan: Plan) -> float:
        """The longest decoded audio one request on `plan` may send."""
        return min(self.max_audio_seconds, plan.max_audio_seconds or self.max_audio_seconds)

    def longest_job_seconds(self, plan: Plan) -> float:
        """The longest decoded audio one job on `plan` may hold: a job is charged whole, so at most
        the plan's audio bucket (a longer one could never be admitted)."""
        longest = min(self.long_form.max_audio_seconds, plan.max_audio_seconds or self.long_form.max_audio_seconds)
        return min(longest, plan.audio_seconds_burst)

    @model_validator(mode="after")
    def _audio_buckets_hold_the_longest_audio(self) -> "IngressOptions":
        # Audio seconds are charged whole, so a bucket smaller than the longest admitted audio
        # would refuse such a request forever, however long the caller waits.
        for name, plan in self.plans.items():
            longest = self.longest_audio_seconds(plan)
            if plan.audio_seconds_burst < longest:
                raise ValueError(
                    f"plan {name!r}: audio_seconds_burst {plan.audio_seconds_burst:g} cannot hold the longest audio it may send"
                    f" ({longest:g} s), so such a request could never be served; raise the burst or lower the plan's"
                    " max_audio_seconds"
                )
        return self


class ScannerOptions(_Strict):
    """Live knobs of the scanner: the hard caps applied while decoding untrusted audio."""

    # A request is decoded under these caps scaled to the audio it may hold (serve_app.media.inspect.decode_limits):
    # a 30 min POST /v1/align gets 1800/36000 of the wall time and of the decoding work.
    max_decoded_seconds: float = Field(36_000.0, gt=0, description="The longest audio any request may decode to (10 h).")
    max_channels: int = Field(8, ge=1, le=64)
    max_sample_rate: int = Field(192_000, ge=8_000)
    max_decode_wall_seconds: float = Field(1200.0, gt=0, description="Wall time to decode max_decoded_seconds (scaled per request).")
    max_source_samples: int = Field(
        36_000 * 48_000 * 2, ge=1, description="Decoding work for max_decoded_seconds: source samples x channels "
        "(10 h of 48 kHz stereo; scaled per request)."
    )
    clamd_timeout_s: float = Field(10.0, gt=0, description="Bound on one clamd scan, connecting included.")
    max_concurrent_scans: int = Field(4, ge=1, le=64, description="Decodes running at once per replica.")


class JobRunnerOptions(_Strict):
    """Live knobs of the job runner: how many jobs it runs, how it retries, when it gives up."""

    max_running_jobs: int = Field(2, ge=1, le=64, description="Jobs one runner replica works on at once.")
    max_running_per_owner: int = Field(
        1, ge=1, le=1000, description="Jobs one principal may have running at once, all runners together: the rest wait, so "
        "others' jobs get the remaining runner slots (fair share)."
    )
    refine_concurrency: int = Field(
        2, ge=1, le=64, description="Window jobs in flight per running job besides its locating window: jobs leave "
        "aligner capacity to POST /v1/align."
    )
    lease_s: float = Field(30.0, ge=2, le=600, description="A job whose runner stopped renewing its claim this long is redelivered.")
    max_attempts: int = Field(3, ge=1, le=20, description="Deliveries of one job (runner deaths) before it fails.")
    window_retries: int = Field(6, ge=0, le=50, description="Retries of one window the aligner failed on (503: replica died, saturated).")
    retry_backoff_s: float = Field(1.0, gt=0, le=60, description="First wait before a retry; doubles, at most 30 s.")
    run_deadline_s: float = Field(900.0, gt=0, description="A job still running this long after it started, plus the share below, fails.")
    run_deadline_per_audio_s: float = Field(0.5, ge=0, description="Seconds of run time allowed per second of audio.")
    align_timeout_s: float = Field(120.0, gt=0, description="Bound on one aligner call.")
    progress_interval_s: float = Field(1.0, gt=0, description="Progress is written at most this often.")
    expiry_sweep_s: float = Field(10.0, gt=0, description="How often ended jobs past their retention are deleted.")
    orphan_sweep_s: float = Field(600.0, gt=0, description="How often job spool files no queued or running job holds are deleted.")
    orphan_age_s: float = Field(
        3600.0, ge=60, description="Such a file is deleted once unwritten this long (longer than any upload and decode takes)."
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After of the 503 problems a job may end with.")


class AlignerOptions(_Strict):
    """Live knobs of the aligner: how jobs are grouped into batches (deployments.batching).

    There is no batch wait: a job that finds the backend free starts at once, and the jobs that
    arrive while a batch runs form the next."""

    max_batch_size: int = Field(8, ge=1, le=64, description="Requests' jobs per batch.")
    max_batch_audio_seconds: float = Field(
        240.0, gt=0, le=7200, description="Audio seconds per batch, all its jobs together (a longer single job runs alone): "
        "what bounds a GPU batch's memory while short clips still pack max_batch_size to a batch."
    )
    max_background_batch_size: int = Field(
        8, ge=1, le=64, description="Job windows per background batch (a request's job waits for the batch running, "
        "never for queued windows)."
    )
    unhealthy_after_failures: int = Field(
        5, ge=1, description="Jobs in a row the backend fails on before the health check runs a probe inference "
        "(if that fails too, Serve replaces the replica).",
    )



class RedisSentinel(_Strict):
    """Redis Sentinel: where the sentinels are and which monitored master to use.

    With it, ALIGNER_REDIS_URL's host and port are ignored (the sentinels name the master); its
    username, password and database number still apply to the master.
    """

    addresses: list[tuple[str, int]] = Field(min_length=1)
    service_name: str = Field(min_length=1)
    password: SecretStr | None = None  # the sentinels' own password (requirepass), if any


def _sentinel_from_env(environ: Mapping[str, str]) -> RedisSentinel | None:
    """`ALIGNER_REDIS_SENTINELS=host:port,host:port` (unset: plain Redis at ALIGNER_REDIS_URL)."""
    listed = environ.get("ALIGNER_REDIS_SENTINELS", "").strip()
    if not listed:
        return None
    addresses = []
    for address in listed.split(","):
        host, separator, port = address.strip().rpartition(":")
        if not separator or not host or not port.isdigit():
            raise ValueError(f"ALIGNER_REDIS_SENTINELS: {address.strip()!r} is not host:port")
        addresses.append((host.strip("[]"), int(port)))
    return RedisSentinel(
        addresses=addresses,
        service_name=environ.get("ALIGNER_REDIS_SENTINEL_SERVICE", "aligner"),
        password=_secret(environ, "ALIGNER_REDIS_SENTINEL_PASSWORD"),
    )


class Environment(_Strict):
    """Dependencies' addresses and secrets, from the process environment (never from YAML)."""

    redis_url: SecretStr  # may embed a password
    redis_sentinel: RedisSentinel | None
    clamd_address: str  # unix:///path/to/clamd.sock or tcp://host:port
    api_key_pepper: SecretStr | None
    introspection_client_secret: SecretStr | None
    audit_log: str  # "stdout" or a file path
    spool_dir: str  # uploads and decoded audio on local disk (serve_app.media.spool)

    @property
    def job_spool_dir(self) -> str:
        """Jobs' decoded audio: apart from the request spool, whose sweep must never take a queued job's."""
        return os.path.join(self.spool_dir, "jobs")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Environment":
        return cls(
            redis_url=environ.get("ALIGNER_REDIS_URL", "redis://127.0.0.1:6380/0"),
            redis_sentinel=_sentinel_from_env(environ),
            clamd_address=environ.get("ALIGNER_CLAMD_ADDRESS", "unix:///run/clamav/clamd.ctl"),
            api_key_pepper=_secret(environ, "ALIGNER_API_KEY_PEPPER"),
            introspection_client_secret=_secret(environ, "ALIGNER_INTROSPECTION_CLIENT_SECRET"),
            audit_log=environ.get("ALIGNER_AUDIT_LOG", "stdout"),
            spool_dir=environ.get("ALIGNER_SPOOL_DIR", "/var/tmp/forced-aligner/spool"),
        )


def _secret(environ: Mapping[str, str], name: str) -> str | None:
    """`NAME` itself, or the contents of the file named by `NAME_FILE` (Kubernetes/Docker secrets)."""
    if environ.get(name):
        return environ[name]
    path = environ.get(f"{name}_FILE")
    return Path(path).read_text().strip() if path else None
