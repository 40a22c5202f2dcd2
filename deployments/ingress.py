"""Ingress deployment: the FastAPI app that every request enters through. HTTP only: routes,
problems, headers; the work is in components it calls.

POST /v1/align reads as the request path:
  1-5. admit the client, authenticate, authorize, shed, take a request token (Depends(authorized))
  6.   hold one of the principal's concurrent requests (all replicas: Redis leases, fail open),
       then a slot of this replica's concurrency cap                     (never depends on Redis)
  7.   stream the multipart body into the spool under a byte cap and a pace (408 when idle or
       trickling); the audio never sits whole in memory                  (serve_app.api.upload)
  8.   validate the transcript and its language                           (serve_app.text.transcript)
  9.   the alignment pipeline: scan (clamd, sniff, capped streamed decode in a Scanner replica),
       check and charge the decoded audio seconds, align it in windows on the batching Aligner
       replicas, stitch the words                                         (serve_app.pipeline.alignment)
  10.  render the words in the requested format                           (serve_app.text.formats)
Each decision is counted (serve_app.metrics) and audited (serve_app.security.audit).

Failure policy: a scanner or aligner that is down, saturated (Serve's max_queued_requests) or too
slow answers 503 with Retry-After; a job the aligner's backend failed on answers 503 (out of
memory: a retry may succeed) or 500 (no traceback), never the 422 of an input that cannot be
aligned (serve_app.pipeline.alignment); clamd down answers 503 (fail closed); Redis down fails
closed for authentication and open for rate limits (serve_app.api.gate); bad input answers a 4xx
problem; nothing answers a traceback.

Health: /v1/health is liveness (this replica answers), /v1/ready is readiness for a load balancer
(ready/unavailable only), both open and free: /v1/ready answers from a report a background task
refreshes every few seconds (scanner + clamd, aligner, Redis), so no request to it ever calls a
dependency. A report that is missing or stale reads as unavailable. The report itself, with which
dependency failed and how, is GET /v1/admin/dependencies (admin scope) and the
aligner_dependency_up gauges.
"""

# No `from __future__ import annotations`: FastAPI must resolve the handlers' annotations at runtime.

import asyncio
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.backends.base import AlignmentJob, BackendInfo, JobOutcome
from deployments.downstream import downstream
from serve_app import metrics
from serve_app.api import admin, jobs
from serve_app.api.openapi_security import with_security_schemes
from serve_app.api.dependencies import authorized
from serve_app.text.formats import OutputFormat
from serve_app.api.gate import Caller, CallerLedger, Gate
from serve_app.text.languages import canonical_language
from serve_app.api.models import (
    ALIGN_REQUEST_BODY,
    AlignForm,
    AlignResponse,
    DependencyReport,
    DependencyStatus,
    Health,
    JobOut,
    Readiness,
    problem_responses,
)
from serve_app.api.jobs import job_out, stored
from serve_app.api.problems import install_problem_handlers
from serve_app.api.request_context import RequestContext
from serve_app.api.render import render_alignment
from serve_app.problems import Problem, unavailable
from serve_app.api.upload import UploadLimits, read_align_form
from serve_app.media.inspect import Verdict
from serve_app.media.spool import Spool, SpooledFile
from serve_app.jobs.store import AtCap, JobStore, NewJob, Replay, namespace_of, new_job_id
from serve_app.pipeline.alignment import Alignment, AlignmentPipeline, AlignmentRequest, AudioAligner
from serve_app.security.audit import AuditLog
from serve_app.security.concurrency import ConcurrencyCapReached
from serve_app.security.shedding import LoadSample
from serve_app.settings import Environment, IngressOptions, LongFormLimits
from serve_app.text.transcript import Transcript, TranscriptRejected, parse_transcript

logger = logging.getLogger("ray.serve")

_BACKEND_INFO_TIMEOUT_S = 5.0
_DEPENDENCY_PROBE_INTERVAL_S = 2.0
_DEPENDENCY_PROBE_TIMEOUT_S = 5.0  # a loaded 2-core box answers a scanner call in seconds
# Older than this, the report no longer describes the dependencies (its task is stuck or dead).
_DEPENDENCY_REPORT_MAX_AGE_S = 3 * (_DEPENDENCY_PROBE_INTERVAL_S + _DEPENDENCY_PROBE_TIMEOUT_S)
_PUBLIC_PATHS = frozenset({"/v1/health", "/v1/ready"})
_SPOOL_ORPHAN_AGE_S = 3600.0  # older spool files at start-up belong to requests that cannot still be running
# An Idempotency-Key (draft-ietf-httpapi-idempotency-key-header): a client-chosen string, typically a
# UUID; printable ASCII without spaces, so it cannot smuggle anything into a log line or a key.
_IDEMPOTENCY_KEY = re.compile(r"^[!-~]{1,255}$")
_IDEMPOTENCY_RESERVATION_S = 60.0  # plus the scan's own bound: a submission that died mid-scan frees its key


def _count_probe_failure(error_type: str) -> None:
    metrics.LOAD_PROBE_FAILURES.inc(tags={"error": error_type})


app = FastAPI(
    title="Forced alignment API",
    version="1",
    description="Word-level timestamps for an audio file and its transcript (Qwen3-ForcedAligner). "
    "Authenticate with an API key (`Authorization: Bearer fa_...` or `X-API-Key`) or an OAuth2 access token.",
    openapi_url="/v1/openapi.json",
    docs_url="/v1/docs",
    redoc_url=None,
    swagger_ui_oauth2_redirect_url=None,
    redirect_slashes=False,  # its 307 built Location from the client's Host header: /v1/align/ is a 404
)
app.openapi = with_security_schemes(app, _PUBLIC_PATHS)
install_problem_handlers(app)
app.add_middleware(RequestContext)
app.include_router(admin.router)
app.include_router(jobs.router)


# Defined before the class: serve.ingress rebuilds the handlers with the module's globals as they are then.
def _status(failure: str | None) -> DependencyStatus:
    return DependencyStatus(status="ready") if failure is None else DependencyStatus(status="unavailable", detail=failure)


@serve.deployment(
    name="Ingress",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=32,
    max_queued_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
    user_config=IngressOptions().model_dump(),
)
@serve.ingress(app)
class Ingress:
    def __init__(self, scanner: DeploymentHandle, aligner: DeploymentHandle, job_runner: DeploymentHandle) -> None:
        metrics.label_with_replica()
        self._scanner = scanner
        self._aligner = aligner
        self._job_runner = job_runner
        self._environment = Environment.from_env()
        self._audit = AuditLog.from_destination(self._environment.audit_log)
        self._spool = Spool(self._environment.spool_dir)
        self._spool.sweep(_SPOOL_ORPHAN_AGE_S)  # not the jobs' directory: a queued job's audio may be older
        self._job_spool = app.state.job_spool = Spool(self._environment.job_spool_dir)
        self._spool_problem: str | None = None  # the last spool-sharing problem the dependency probe logged
        self._gate: Gate | None = None
        self._backend: BackendInfo | None = None  # fetched from the aligner once, then cached
        self._background: list[asyncio.Task] = []
        self._dependencies: DependencyReport | None = None  # refreshed by _probe_dependencies
        self._dependencies_probed_at = 0.0  # time.monotonic() of that report

    async def reconfigure(self, user_config: dict) -> None:
        self._options = IngressOptions.model_validate(user_config)
        if self._gate is None:
            self._gate = app.state.gate = Gate(self._environment, self._options, self._audit)
            self._jobs = app.state.jobs = JobStore(self._gate.redis, namespace_of(serve.get_replica_context().app_name))
            self._background = [
                asyncio.create_task(self._gate.shedder.run(self._probe_load, _count_probe_failure)),
                asyncio.create_task(self._probe_dependencies()),
            ]
        else:
            self._gate.reconfigure(self._options)

    async def __del__(self) -> None:
        for task in self._background:
            task.cancel()
        if self._gate is not None:
            await self._gate.close()

    @app.post(
        "/v1/align",
        response_model=AlignResponse,
        summary="Align a transcript to an audio file",
        openapi_extra={"requestBody": ALIGN_REQUEST_BODY},
        responses={
            200: {
                "content": {
                    "application/x-subrip": {"schema": {"type": "string"}},
                    "text/vtt": {"schema": {"type": "string"}},
                    "text/plain": {"schema": {"type": "string"}},
                }
            },
            **problem_responses(400, 401, 403, 408, 413, 415, 422, 429, 500, 503),
        },
    )
    async def align(self, request: Request, caller: Caller = Depends(authorized("align"))) -> Response:
        options = self._options  # one consistent snapshot for the whole request
        async with self._request_slots(caller, options):
            return await self._align_request(request, caller, options)

    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobOut,
        summary="Submit an asynchronous alignment job (the long-form limits apply)",
        openapi_extra={
            "requestBody": ALIGN_REQUEST_BODY,
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "pattern": _IDEMPOTENCY_KEY.pattern},
                    "description": "A retried submission with the same key and request returns the same job, charged once.",
                }
            ],
        },
        responses={
            202: {"description": "Accepted: queued. `Location` is the job; poll it.", "headers": {"Location": {"schema": {"type": "string"}}}},
            **problem_responses(400, 401, 403, 408, 409, 413, 415, 422, 429, 500, 503),
        },
    )
    async def submit_job(self, request: Request, caller: Caller = Depends(authorized("align"))) -> Response:
        options = self._options
        key = request.headers.get("idempotency-key")
        if key is not None and not _IDEMPOTENCY_KEY.match(key):
            raise Problem("invalid-request", "Idempotency-Key must be 1-255 printable ASCII characters without spaces")
        async with self._request_slots(caller, options):
            return await self._submit_job(request, caller, options, key)

    @asynccontextmanager
    async def _request_slots(self, caller: Caller, options: IngressOptions) -> AsyncIterator[None]:
        """One of the principal's concurrent requests, then one of this replica's."""
        try:
            async with self._gate.concurrency_slot(caller), self._gate.limiter.local_slot():
                yield
        except ConcurrencyCapReached:
            raise Problem(
                "temporary-reduced-capacity",
                "this replica is at its concurrency limit; retry later",
                headers={"Retry-After": str(options.retry_after_s)},
            ) from None

    async def _align_request(self, request: Request, caller: Caller, options: IngressOptions) -> Response:
        form = await self._read_form(request, options, options.max_upload_bytes, options.max_transcript_chars)
        try:
            transcript, backend = await self._checked_transcript(form, options, options.max_transcript_chars, options.max_transcript_units)
        except BaseException:
            self._spool.remove(form.audio)  # the pipeline owns the upload only once it runs
            raise
        alignment = await self._pipeline(backend, options).run(
            AlignmentRequest(form.audio, form.audio_content_type, transcript, self._gate.longest_audio_seconds(caller)),
            CallerLedger(self._gate, caller),
        )
        return self._render(form.format, request, transcript, alignment, backend)

    async def _submit_job(self, request: Request, caller: Caller, options: IngressOptions, key: str | None) -> Response:
        """POST /v1/jobs: the intake of POST /v1/align (scan, check, charge), then queue the rest.

        The scan runs before the job exists, so a hostile or undecodable upload, or a quota that
        cannot pay for it, is refused to the submitter (4xx/429), never a job that fails later;
        and the decoded duration is what the job is charged, once, at submission.
        """
        limits: LongFormLimits = options.long_form
        form = await self._read_form(request, options, limits.max_upload_bytes, limits.max_transcript_chars)
        owner, plan = caller.principal_key, self._gate.plan_of(caller)
        fingerprint = hashlib.sha256(
            "\0".join((form.audio.sha256, hashlib.sha256(form.text.encode()).hexdigest(), form.language or "", form.format.value)).encode()
        ).hexdigest()
        reserved = False
        try:
            transcript, backend = await self._checked_transcript(form, options, limits.max_transcript_chars, limits.max_transcript_units)
            if key is not None:
                ttl = _IDEMPOTENCY_RESERVATION_S + options.scan_timeout_for(form.audio.size)
                replay = await stored(self._jobs.reserve_idempotency(owner, key, fingerprint, ttl), self._gate)
                if replay is not None:
                    self._spool.remove(form.audio)
                    return await self._replayed(replay, caller)
                reserved = True
            if await stored(self._jobs.active_count(owner), self._gate) >= plan.max_active_jobs:
                raise self._jobs_full(caller, plan.max_active_jobs, options)
        except BaseException:
            self._spool.remove(form.audio)
            if reserved:
                await self._release(owner, key, fingerprint)
            raise
        try:
            audio = await self._pipeline(backend, options).intake(
                AlignmentRequest(form.audio, form.audio_content_type, transcript, options.longest_job_seconds(plan)),
                CallerLedger(self._gate, caller),
            )
        except BaseException:
            if reserved:
                await self._release(owner, key, fingerprint)
            raise
        job = NewJob(
            id=new_job_id(), owner=owner, principal_id=caller.principal.id, created_at=time.time(),
            language=transcript.language, format=form.format.value, transcript=form.text, duration=audio.duration_seconds,
            pcm_path="", envelope_path="", audio_bucket=(plan.audio_seconds_burst, plan.audio_seconds_per_hour / 3600),
            retain_s=options.jobs.retention_s,
        )  # fmt: skip
        moved: str | None = None
        envelope: SpooledFile | None = None
        try:
            moved = self._job_spool.move_in(audio.pcm_path)  # out of reach of the request spool's sweep
            with self._job_spool.writer("envelope") as writer:
                writer.write(audio.envelope.astype("<f4"))
                envelope = writer.commit()
            job = dataclasses.replace(job, pcm_path=moved, envelope_path=envelope.path)
            created = await stored(self._jobs.submit(job, plan.max_active_jobs, (key, fingerprint) if key else None), self._gate)
            if isinstance(created, AtCap):  # another submission took the last place meanwhile
                raise self._jobs_full(caller, plan.max_active_jobs, options)
        except BaseException:
            self._spool.remove(audio.pcm_path) if moved is None else self._job_spool.remove(moved)
            if envelope is not None:
                self._job_spool.remove(envelope)
            await self._gate.refund_audio(caller, audio.duration_seconds)
            if reserved:
                await self._release(owner, key, fingerprint)
            raise
        metrics.JOBS.inc(tags={"event": "submitted"})
        self._gate.audit.record(caller.audit, "job", "submitted", "queued", job_id=job.id, decoded_seconds=round(job.duration, 3))
        record = await stored(self._jobs.get(job.id, time.time()), self._gate)
        return self._job_accepted(record, replayed=False)

    async def _replayed(self, replay: Replay, caller: Caller) -> Response:
        if replay.job_id is None:
            raise Problem(
                "idempotency-key-in-use",
                "a submission with this Idempotency-Key is still being processed; retry when it has been answered",
                headers={"Retry-After": str(self._options.retry_after_s)},
            )
        if not replay.same_request:
            raise Problem("idempotency-key-reused", "this Idempotency-Key was used for a different request; use a new key")
        record = await stored(self._jobs.get(replay.job_id, time.time()), self._gate)
        if record is None:  # ended and expired: the key now means nothing
            raise Problem("idempotency-key-reused", "the job this Idempotency-Key created has expired; use a new key")
        self._gate.audit.record(caller.audit, "job", "replayed", "idempotency-key", job_id=record.id)
        return self._job_accepted(record, replayed=True)

    @staticmethod
    def _job_accepted(record, *, replayed: bool) -> Response:
        headers = {"Location": f"/v1/jobs/{record.id}"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(job_out(record).model_dump(mode="json"), status_code=202, headers=headers)

    def _jobs_full(self, caller: Caller, limit: int, options: IngressOptions) -> Problem:
        metrics.RATELIMIT_DECISIONS.inc(tags={"policy": "jobs", "result": "denied"})
        self._gate.audit.record(caller.audit, "limit", "denied", "jobs", limit=limit)
        return Problem(
            "quota-exceeded",
            f"{limit} jobs of this principal are already queued or running; retry when one has ended",
            headers={"Retry-After": str(options.retry_after_s)},
            extensions={"violated-policies": ["jobs"]},
        )

    async def _release(self, owner: str, key: str, fingerprint: str) -> None:
        try:
            await self._jobs.release_idempotency(owner, key, fingerprint)
        except Exception as error:  # the reservation then lapses by its TTL
            logger.warning("could not release an Idempotency-Key reservation: %s", type(error).__name__)

    @app.get("/v1/health", response_model=Health, summary="Liveness")
    async def health(self) -> Health:
        return Health(status="ok")

    @app.get(
        "/v1/ready",
        response_model=Readiness,
        summary="Readiness, for load balancers (details: GET /v1/admin/dependencies)",
        responses={503: {"model": Readiness}},
    )
    async def ready(self) -> JSONResponse:
        report = self._fresh_dependencies()
        ready = report is not None and report.status == "ready"
        jobs_ready = report is not None and report.checks["jobs"].status == "ready"
        body = Readiness(status="ready" if ready else "unavailable", jobs="ready" if jobs_ready else "unavailable")
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @app.get(
        "/v1/admin/dependencies",
        response_model=DependencyReport,
        tags=["admin"],
        summary="Each dependency's state at the last background probe",
        responses=problem_responses(400, 401, 403, 429, 503),
    )
    async def dependencies(self, caller: Caller = Depends(authorized("admin"))) -> DependencyReport:
        report = self._fresh_dependencies()
        if report is None:
            raise unavailable("no recent dependency probe; retry later", self._options.retry_after_s)
        return report.model_copy(update={"age_s": round(time.monotonic() - self._dependencies_probed_at, 3)})

    def _fresh_dependencies(self) -> DependencyReport | None:
        if time.monotonic() - self._dependencies_probed_at > _DEPENDENCY_REPORT_MAX_AGE_S:
            return None
        return self._dependencies

    # -- steps of the request path -------------------------------------------------------------

    async def _read_form(self, request: Request, options: IngressOptions, max_body_bytes: int, max_transcript_chars: int) -> AlignForm:
        with metrics.timed("upload"):
            return await read_align_form(
                request,
                UploadLimits(
                    max_body_bytes=max_body_bytes,
                    max_text_bytes=max_transcript_chars * 4,
                    idle_timeout_s=options.upload_idle_timeout_s,
                    min_bytes_per_s=options.upload_min_bytes_per_s,
                    rate_grace_s=options.upload_rate_grace_s,
                ),
                self._spool,
            )

    async def _checked_transcript(
        self, form: AlignForm, options: IngressOptions, max_chars: int, max_units: int
    ) -> tuple[Transcript, BackendInfo]:
        """The transcript, in a language the loaded backend aligns; and that backend."""
        transcript = self._parse_transcript(form, options, max_chars, max_units)
        backend = await self._backend_info(options)
        if transcript.language not in backend.languages:
            raise Problem("unsupported-language", f"the {backend.name} backend does not align {transcript.language}")
        return transcript, backend

    @staticmethod
    def _parse_transcript(form: AlignForm, options: IngressOptions, max_chars: int, max_units: int) -> Transcript:
        language = options.default_language
        if form.language:
            language = canonical_language(form.language)
            if language is None:
                raise Problem("unsupported-language", "unsupported language; use a name or ISO code of one of the 11 supported languages")
        try:
            return parse_transcript(form.text, language, max_chars=max_chars, max_units=max_units)
        except TranscriptRejected as rejected:
            raise Problem(rejected.reason, rejected.detail) from None

    async def _backend_info(self, options: IngressOptions) -> BackendInfo:
        if self._backend is None:
            self._backend = await self._downstream(self._aligner.info.remote(), "aligner", _BACKEND_INFO_TIMEOUT_S, options)
        return self._backend

    def _pipeline(self, backend: BackendInfo, options: IngressOptions) -> AlignmentPipeline:
        """The pipeline with this request's options: the deployments behind timeouts and 503s."""

        async def scan(upload: SpooledFile, max_audio_seconds: float, share_up_to_s: float) -> Verdict:
            call = self._scanner.inspect.remote(upload, max_audio_seconds, share_up_to_s)
            return await self._downstream(call, "scanner", options.scan_timeout_for(upload.size), options)

        async def align(job: AlignmentJob) -> JobOutcome:
            return await self._downstream(self._aligner.align.remote(job), "aligner", options.align_timeout_s, options)

        return AlignmentPipeline(scan, AudioAligner(align, backend, options.retry_after_s), self._spool, options.retry_after_s)

    @staticmethod
    async def _downstream(response, name: str, timeout_s: float, options: IngressOptions):
        return await downstream(response, name, timeout_s, options.retry_after_s)

    @staticmethod
    def _render(output: OutputFormat, request: Request, transcript: Transcript, alignment: Alignment, backend: BackendInfo) -> Response:
        return render_alignment(
            output, id=request.state.request_id, language=transcript.language, duration=alignment.duration,
            backend=backend.name, model=backend.model, words=alignment.words,
        )  # fmt: skip

    # -- background: load and dependency health --------------------------------------------------

    async def _probe_load(self) -> LoadSample:
        """The aligner's and scanner's own view of their load, for the shedder (about once a second).

        No timeout here: the shedder bounds the probe and counts one that does not answer, and never
        reads slowness as load (serve_app.security.shedding).
        """
        aligner, scanner = await asyncio.gather(self._aligner.load.remote(), self._scanner.load.remote())
        return LoadSample(**aligner, **scanner)

    async def _probe_dependencies(self) -> None:
        # Re-set periodically: a Ray gauge disappears from the export ~30 s after its last set().
        while True:
            try:
                self._dependencies = await self._check_dependencies()
                self._dependencies_probed_at = time.monotonic()
                for name, check in self._dependencies.checks.items():  # jobs included: aligner_dependency_up{dependency="jobs"}
                    if name != "clamd":  # the Scanner replicas export their own clamd gauge
                        metrics.DEPENDENCY_UP.set(1 if check.status == "ready" else 0, tags={"dependency": name})
            except Exception as error:  # a dead task would leave /v1/ready unavailable for good: log, go on
                logger.error("dependency probe failed: %s", type(error).__name__)
            await asyncio.sleep(_DEPENDENCY_PROBE_INTERVAL_S)

    async def _check_dependencies(self) -> DependencyReport:
        scanner, aligner, redis, runner, queue, scanner_spool = await asyncio.gather(
            self._probe(self._scanner.ready.remote()),
            self._probe(self._aligner.info.remote()),
            self._probe(self._gate.redis.ping()),
            self._probe(self._job_runner.status.remote()),
            self._probe(self._jobs.state_counts()),
            self._probe(self._scanner.spool_volume.remote()),
        )
        clamd_up, scanner_failure = scanner
        backend, aligner_failure = aligner
        redis_up, redis_failure = redis
        checks = {
            "scanner": _status(scanner_failure),
            "aligner": _status(aligner_failure),
            "redis": _status(redis_failure or (None if redis_up else "no PONG")),
        }
        if scanner_failure is None:  # clamd is reached through the scanner
            checks["clamd"] = _status(None if clamd_up else "not answering")
        runner_spool = runner[0].get("spool_volume") if isinstance(runner[0], dict) else None
        checks["spool"] = _status(self._spool_apart(scanner_spool[0], runner_spool))
        if isinstance(backend, BackendInfo):
            self._backend = backend
        ready = all(check.status == "ready" for check in checks.values()) and "clamd" in checks
        counts, queue_failure = queue
        checks["jobs"] = _status(
            None if runner[1] is None and queue_failure is None else f"job runner: {runner[1] or 'ready'}; queue: {queue_failure or 'ready'}"
        )
        if isinstance(counts, dict):
            checks["jobs"].detail = f"{counts['queued']} queued, {counts['running']} running"
        return DependencyReport(
            status="ready" if ready else "unavailable",
            backend=backend.name if isinstance(backend, BackendInfo) else None,
            model=backend.model if isinstance(backend, BackendInfo) else None,
            checks=checks,
        )

    def _spool_apart(self, scanner_volume: object, runner_volume: object) -> str | None:
        """Which replica the probe reached sees another spool than this one (None: all it reached share it).

        Replicas hand each other spool paths: a scanner on a node without the shared spool would
        miss every upload sent to it. An unreachable replica is the scanner or jobs check's to report.
        """
        apart = [
            name
            for name, theirs, ours in (("scanner", scanner_volume, self._spool.volume), ("job runner", runner_volume, self._job_spool.volume))
            if theirs is not None and theirs != ours
        ]
        detail = f"the {' and '.join(apart)} reached sees another spool: ALIGNER_SPOOL_DIR must be one shared filesystem on every node" if apart else None
        if detail is not None and detail != self._spool_problem:  # once per change, not once per probe
            logger.error("spool not shared: %s", detail)
        self._spool_problem = detail
        return detail

    @staticmethod
    async def _probe(call) -> tuple[object, str | None]:
        """(result, None), or (None, the failure's type name): any exception, back-pressure and timeouts included."""
        try:
            return await asyncio.wait_for(call, _DEPENDENCY_PROBE_TIMEOUT_S), None
        except asyncio.TimeoutError:
            if hasattr(call, "cancel"):
                call.cancel()
            return None, "Timeout"
        except Exception as error:  # the message of a remote error is a traceback: keep the type only
            return None, type(error).__name__

