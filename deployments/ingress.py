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
import logging
import time
import uuid

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.backends.base import AlignmentJob, BackendInfo, JobOutcome
from serve_app import metrics
from serve_app.api import admin
from serve_app.text import formats
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
    Readiness,
    WordOut,
    problem_responses,
)
from serve_app.api.problems import install_problem_handlers
from serve_app.problems import Problem, unavailable
from serve_app.api.upload import UploadLimits, read_align_form
from serve_app.proxy_middleware import is_safe_request_id
from serve_app.media.inspect import Verdict
from serve_app.media.spool import Spool, SpooledFile
from serve_app.pipeline.alignment import Alignment, AlignmentPipeline, AlignmentRequest
from serve_app.security.audit import AuditLog
from serve_app.security.concurrency import ConcurrencyCapReached
from serve_app.security.ratelimit_headers import rate_limit_headers
from serve_app.security.shedding import LoadSample
from serve_app.settings import Environment, IngressOptions
from serve_app.text.transcript import Transcript, TranscriptRejected, parse_transcript

logger = logging.getLogger("ray.serve")

_BACKEND_INFO_TIMEOUT_S = 5.0
_DEPENDENCY_PROBE_INTERVAL_S = 2.0
_DEPENDENCY_PROBE_TIMEOUT_S = 5.0  # a loaded 2-core box answers a scanner call in seconds
# Older than this, the report no longer describes the dependencies (its task is stuck or dead).
_DEPENDENCY_REPORT_MAX_AGE_S = 3 * (_DEPENDENCY_PROBE_INTERVAL_S + _DEPENDENCY_PROBE_TIMEOUT_S)
_PUBLIC_PATHS = frozenset({"/v1/health", "/v1/ready"})
_SPOOL_ORPHAN_AGE_S = 3600.0  # older spool files at start-up belong to requests that cannot still be running


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
app.include_router(admin.router)


@app.middleware("http")
async def _request_context(request: Request, call_next):
    # The proxy middleware replaced an unsafe client id before Serve read it, so this is the id of
    # Serve's logs and the response header; the check only matters without that middleware.
    supplied = request.headers.get("x-request-id", "")
    request.state.request_id = supplied if is_safe_request_id(supplied) else uuid.uuid4().hex
    started = time.perf_counter()
    response = await call_next(request)
    caller: Caller | None = getattr(request.state, "caller", None)
    if caller is not None:  # every answer to an identified caller, errors included
        response.headers.update(rate_limit_headers(caller.decisions.values()))
    route = request.scope.get("route")
    metrics.REQUESTS.inc(tags={"route": route.path_format if route else "unmatched", "status": str(response.status_code)})
    metrics.STAGE_SECONDS.observe(time.perf_counter() - started, tags={"stage": "total"})
    return response


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
    def __init__(self, scanner: DeploymentHandle, aligner: DeploymentHandle) -> None:
        metrics.label_with_replica()
        self._scanner = scanner
        self._aligner = aligner
        self._environment = Environment.from_env()
        self._audit = AuditLog.from_destination(self._environment.audit_log)
        self._spool = Spool(self._environment.spool_dir)
        self._spool.sweep(_SPOOL_ORPHAN_AGE_S)
        self._gate: Gate | None = None
        self._backend: BackendInfo | None = None  # fetched from the aligner once, then cached
        self._background: list[asyncio.Task] = []
        self._dependencies: DependencyReport | None = None  # refreshed by _probe_dependencies
        self._dependencies_probed_at = 0.0  # time.monotonic() of that report

    async def reconfigure(self, user_config: dict) -> None:
        self._options = IngressOptions.model_validate(user_config)
        if self._gate is None:
            self._gate = app.state.gate = Gate(self._environment, self._options, self._audit)
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
        try:
            async with self._gate.concurrency_slot(caller), self._gate.limiter.local_slot():
                return await self._align_request(request, caller, options)
        except ConcurrencyCapReached:
            raise Problem(
                "temporary-reduced-capacity",
                "this replica is at its concurrency limit; retry later",
                headers={"Retry-After": str(options.retry_after_s)},
            ) from None

    async def _align_request(self, request: Request, caller: Caller, options: IngressOptions) -> Response:
        with metrics.timed("upload"):
            form = await read_align_form(
                request,
                UploadLimits(
                    max_body_bytes=options.max_upload_bytes,
                    max_text_bytes=options.max_transcript_chars * 4,
                    idle_timeout_s=options.upload_idle_timeout_s,
                    min_bytes_per_s=options.upload_min_bytes_per_s,
                    rate_grace_s=options.upload_rate_grace_s,
                ),
                self._spool,
            )
        try:
            transcript = self._parse_transcript(form, options)
            backend = await self._backend_info(options)
            if transcript.language not in backend.languages:
                raise Problem("unsupported-language", f"the {backend.name} backend does not align {transcript.language}")
        except BaseException:
            self._spool.remove(form.audio)  # the pipeline owns the upload only once it runs
            raise
        alignment = await self._pipeline(backend, options).run(
            AlignmentRequest(form.audio, form.audio_content_type, transcript, self._gate.longest_audio_seconds(caller)),
            CallerLedger(self._gate, caller),
        )
        return self._render(form.format, request, transcript, alignment, backend)

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
        body = Readiness(status="ready" if ready else "unavailable")
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

    @staticmethod
    def _parse_transcript(form: AlignForm, options: IngressOptions) -> Transcript:
        language = options.default_language
        if form.language:
            language = canonical_language(form.language)
            if language is None:
                raise Problem("unsupported-language", "unsupported language; use a name or ISO code of one of the 11 supported languages")
        try:
            return parse_transcript(
                form.text, language, max_chars=options.max_transcript_chars, max_units=options.max_transcript_units
            )
        except TranscriptRejected as rejected:
            raise Problem(rejected.reason, rejected.detail) from None

    async def _backend_info(self, options: IngressOptions) -> BackendInfo:
        if self._backend is None:
            self._backend = await self._downstream(self._aligner.info.remote(), "aligner", _BACKEND_INFO_TIMEOUT_S, options)
        return self._backend

    def _pipeline(self, backend: BackendInfo, options: IngressOptions) -> AlignmentPipeline:
        """The pipeline with this request's options: the deployments behind timeouts and 503s."""

        async def scan(upload: SpooledFile, max_audio_seconds: float) -> Verdict:
            call = self._scanner.inspect.remote(upload, max_audio_seconds)
            return await self._downstream(call, "scanner", options.scan_timeout_for(upload.size), options)

        async def align(job: AlignmentJob) -> JobOutcome:
            return await self._downstream(self._aligner.align.remote(job), "aligner", options.align_timeout_s, options)

        return AlignmentPipeline(scan, align, self._spool, backend, options.retry_after_s)

    @staticmethod
    async def _downstream(response, name: str, timeout_s: float, options: IngressOptions):
        """Await a downstream call; saturation, death and slowness all become 503 + Retry-After."""
        try:
            return await asyncio.wait_for(response, timeout_s)
        except BackPressureError:
            raise unavailable(f"the {name} is at capacity; retry later", options.retry_after_s) from None
        except asyncio.TimeoutError:
            response.cancel()
            raise unavailable(f"the {name} did not answer in time; retry later", options.retry_after_s) from None
        except RayError as error:
            # The message of a remote error is a full traceback: log the type only.
            logger.error("%s call failed: %s", name, type(error).__name__)
            raise unavailable(f"the {name} failed; retry later", options.retry_after_s) from None

    @staticmethod
    def _render(output: OutputFormat, request: Request, transcript: Transcript, alignment: Alignment, backend: BackendInfo) -> Response:
        words, duration = alignment.words, round(alignment.duration, 3)
        if output is OutputFormat.srt:
            return PlainTextResponse(formats.to_srt(words), media_type=formats.MEDIA_TYPES[output])
        if output is OutputFormat.vtt:
            return PlainTextResponse(formats.to_vtt(words), media_type=formats.MEDIA_TYPES[output])
        if output is OutputFormat.textgrid:
            return PlainTextResponse(formats.to_textgrid(words, duration), media_type=formats.MEDIA_TYPES[output])
        body = AlignResponse(
            id=request.state.request_id,
            language=transcript.language,
            duration=duration,
            backend=backend.name,
            model=backend.model,
            words=[WordOut(text=word.text, start=word.start, end=word.end) for word in words],
        )
        return JSONResponse(body.model_dump())

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
                for name, check in self._dependencies.checks.items():
                    if name != "clamd":  # the Scanner replicas export their own clamd gauge
                        metrics.DEPENDENCY_UP.set(1 if check.status == "ready" else 0, tags={"dependency": name})
            except Exception as error:  # a dead task would leave /v1/ready unavailable for good: log, go on
                logger.error("dependency probe failed: %s", type(error).__name__)
            await asyncio.sleep(_DEPENDENCY_PROBE_INTERVAL_S)

    async def _check_dependencies(self) -> DependencyReport:
        scanner, aligner, redis = await asyncio.gather(
            self._probe(self._scanner.ready.remote()), self._probe(self._aligner.info.remote()), self._probe(self._gate.redis.ping())
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
        if isinstance(backend, BackendInfo):
            self._backend = backend
        return DependencyReport(
            status="ready" if all(check.status == "ready" for check in checks.values()) and "clamd" in checks else "unavailable",
            backend=backend.name if isinstance(backend, BackendInfo) else None,
            model=backend.model if isinstance(backend, BackendInfo) else None,
            checks=checks,
        )

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

