"""Ingress deployment: the FastAPI app that every request enters through.

POST /v1/align reads as the request path:
  1-5. admit the client, authenticate, authorize, shed, take a request token (Depends(authorized))
  6.   hold one of the principal's concurrent requests (all replicas: Redis leases, fail open),
       then a slot of this replica's concurrency cap                     (never depends on Redis)
  7.   stream the multipart body under a byte cap and a pace (408 when idle or trickling)
                                                                          (serve_app.api.upload)
  8.   validate the transcript and its language                           (serve_app.text.transcript)
  9.   scan: clamd, sniff, capped decode in a Scanner replica             (deployments.scanner)
  10.  charge the decoded audio seconds; check duration and plausibility
  11.  align in a batching Aligner replica                                (deployments.aligner)
  12.  map unit times back to the caller's words and render               (serve_app.text.timing, api.formats)
Each decision is counted (serve_app.metrics) and audited (serve_app.security.audit).

Failure policy: a scanner or aligner that is down, saturated (Serve's max_queued_requests) or too
slow answers 503 with Retry-After; clamd down answers 503 (fail closed); Redis down fails closed for
authentication and open for rate limits (serve_app.api.gate); bad input answers a 4xx problem;
nothing answers a traceback.
"""

# No `from __future__ import annotations`: FastAPI must resolve the handlers' annotations at runtime.

import asyncio
import dataclasses
import logging
import re
import time
import uuid

import numpy as np
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.backends.base import AlignmentFailed, AlignmentJob, BackendInfo, UnitTiming
from serve_app import metrics
from serve_app.api import admin, formats
from serve_app.api.dependencies import authorized
from serve_app.api.formats import OutputFormat
from serve_app.api.gate import Caller, Gate
from serve_app.api.languages import canonical_language
from serve_app.api.models import (
    ALIGN_REQUEST_BODY,
    AlignForm,
    AlignResponse,
    DependencyStatus,
    Health,
    Readiness,
    WordOut,
    problem_responses,
)
from serve_app.api.problems import PROBLEM_TYPES, Problem, install_problem_handlers, unavailable
from serve_app.api.upload import UploadLimits, read_align_form
from serve_app.media import DecodedAudio
from serve_app.media.inspect import Rejection, ScanUnavailable
from serve_app.security.audit import AuditLog
from serve_app.security.concurrency import ConcurrencyCapReached
from serve_app.security.ratelimit_headers import rate_limit_headers
from serve_app.security.shedding import LoadSample
from serve_app.settings import Environment, IngressOptions
from serve_app.text.timing import WordTiming, word_timings
from serve_app.text.transcript import Transcript, TranscriptRejected, check_plausible, parse_transcript

logger = logging.getLogger("ray.serve")

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_READY_TIMEOUT_S = 5.0
_DEPENDENCY_PROBE_INTERVAL_S = 5.0
_MIN_AUDIO_SECONDS = 0.1  # shorter holds no alignable word (Qwen3's time grid is 80 ms)


app = FastAPI(
    title="Forced alignment API",
    version="1",
    description="Word-level timestamps for an audio file and its transcript (Qwen3-ForcedAligner). "
    "Authenticate with an API key (`Authorization: Bearer fa_...` or `X-API-Key`) or an OAuth2 access token.",
    openapi_url="/v1/openapi.json",
    docs_url="/v1/docs",
    redoc_url=None,
    swagger_ui_oauth2_redirect_url=None,
)
install_problem_handlers(app)
app.include_router(admin.router)


@app.middleware("http")
async def _request_context(request: Request, call_next):
    # Serve's proxy puts an x-request-id on every request (the client's or a generated one). Only a
    # well-formed id is echoed in bodies, so a client cannot inject text into our documents or logs.
    supplied = request.headers.get("x-request-id", "")
    request.state.request_id = supplied if _SAFE_REQUEST_ID.match(supplied) else uuid.uuid4().hex
    started = time.perf_counter()
    response = await call_next(request)
    caller: Caller | None = getattr(request.state, "caller", None)
    if caller is not None:  # every answer to an identified caller, errors included
        response.headers.update(rate_limit_headers(caller.decisions.values()))
    route = request.scope.get("route")
    metrics.REQUESTS.inc(tags={"route": route.path if route else "unmatched", "status": str(response.status_code)})
    metrics.STAGE_SECONDS.observe(time.perf_counter() - started, tags={"stage": "total"})
    return response


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
        self._gate: Gate | None = None
        self._backend: BackendInfo | None = None  # fetched from the aligner once, then cached
        self._background: list[asyncio.Task] = []
        self._last_load: LoadSample | None = None

    async def reconfigure(self, user_config: dict) -> None:
        self._options = IngressOptions.model_validate(user_config)
        if self._gate is None:
            self._gate = app.state.gate = Gate(self._environment, self._options, self._audit)
            self._background = [
                asyncio.create_task(self._gate.shedder.run(self._probe_load)),
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
            )
        transcript = self._parse_transcript(form, options)
        backend = await self._backend_info(options)
        if transcript.language not in backend.languages:
            raise Problem("unsupported-language", f"the {backend.name} backend does not align {transcript.language}")

        audio = await self._scan(form, caller, options)
        await self._gate.charge_audio(caller, audio.duration_seconds)
        self._check_duration(audio, backend, transcript)

        timings = await self._align(AlignmentJob(audio.samples, transcript.units, transcript.language), options)
        metrics.AUDIO_SECONDS.inc(audio.duration_seconds, tags={"backend": backend.name})
        words = word_timings(transcript, timings, audio.duration_seconds)
        return self._render(form.format, request, transcript, audio, backend, words)

    @app.get("/v1/health", response_model=Health, summary="Liveness")
    async def health(self) -> Health:
        return Health(status="ok")

    @app.get("/v1/ready", response_model=Readiness, summary="Readiness of each dependency", responses={503: {"model": Readiness}})
    async def ready(self) -> JSONResponse:
        checks: dict[str, DependencyStatus] = {}
        backend: BackendInfo | None = None
        try:
            clamd_up = await asyncio.wait_for(self._scanner.ready.remote(), _READY_TIMEOUT_S)
            checks["scanner"] = DependencyStatus(status="ready")
            checks["clamd"] = DependencyStatus(status="ready" if clamd_up else "unavailable")
        except (RayError, asyncio.TimeoutError) as error:
            checks["scanner"] = DependencyStatus(status="unavailable", detail=type(error).__name__)
        try:
            backend = await asyncio.wait_for(self._aligner.info.remote(), _READY_TIMEOUT_S)
            checks["aligner"] = DependencyStatus(status="ready")
        except (RayError, asyncio.TimeoutError) as error:
            checks["aligner"] = DependencyStatus(status="unavailable", detail=type(error).__name__)
        checks["redis"] = DependencyStatus(status="ready" if await self._redis_answers() else "unavailable")
        ready = all(check.status == "ready" for check in checks.values())
        body = Readiness(
            status="ready" if ready else "unavailable",
            backend=backend.name if backend else None,
            model=backend.model if backend else None,
            checks=checks,
        )
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

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
            self._backend = await self._downstream(self._aligner.info.remote(), "aligner", _READY_TIMEOUT_S, options)
        return self._backend

    async def _scan(self, form: AlignForm, caller: Caller, options: IngressOptions) -> DecodedAudio:
        with metrics.timed("scan"):
            # A numpy view crosses the hop without a copy into a Python bytes object on the other side.
            verdict = await self._downstream(
                self._scanner.inspect.remote(np.frombuffer(form.audio, dtype=np.uint8)), "scanner", options.scan_timeout_s, options
            )
        if isinstance(verdict, ScanUnavailable):
            metrics.DEPENDENCY_ERRORS.inc(tags={"dependency": "clamd", "use": "scan"})
            self._gate.audit.record(caller.audit, "scan", "unavailable", verdict.reason)
            raise unavailable("the malware scanner is unavailable; retry later", options.retry_after_s)
        if isinstance(verdict, Rejection):
            await self._gate.upload_refused(caller, verdict.reason, verdict.signature)
            raise Problem(verdict.reason, verdict.detail)
        self._gate.audit.record(
            caller.audit, "scan", "allowed", "clean",
            upload_bytes=len(form.audio), decoded_seconds=round(verdict.duration_seconds, 3), container=verdict.container,
            declared_type=form.audio_content_type,
        )  # fmt: skip
        return verdict

    @staticmethod
    def _check_duration(audio: DecodedAudio, backend: BackendInfo, transcript: Transcript) -> None:
        if audio.duration_seconds < _MIN_AUDIO_SECONDS:
            raise Problem("audio-too-short", f"the audio lasts {audio.duration_seconds:.3f} s; at least {_MIN_AUDIO_SECONDS} s is needed")
        if audio.duration_seconds > backend.max_audio_seconds:
            raise Problem(
                "audio-too-long",
                f"the audio lasts {audio.duration_seconds:.1f} s; the {backend.name} backend aligns at most {backend.max_audio_seconds:.0f} s",
            )
        try:
            check_plausible(transcript, audio.duration_seconds)
        except TranscriptRejected as rejected:
            raise Problem(rejected.reason, rejected.detail) from None

    async def _align(self, job: AlignmentJob, options: IngressOptions) -> list[UnitTiming]:
        with metrics.timed("align"):
            outcome = await self._downstream(self._aligner.align.remote(job), "aligner", options.align_timeout_s, options)
        if isinstance(outcome, AlignmentFailed):
            slug = outcome.reason if outcome.reason in PROBLEM_TYPES else "no-alignment-found"
            raise Problem(slug, outcome.detail)
        return outcome

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
    def _render(
        output: OutputFormat,
        request: Request,
        transcript: Transcript,
        audio: DecodedAudio,
        backend: BackendInfo,
        words: list[WordTiming],
    ) -> Response:
        duration = round(audio.duration_seconds, 3)
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

        A status call that cannot get through within the shedder's interval means the aligner is
        saturated (Serve holds calls beyond max_ongoing_requests): that is reported as full load.
        """
        try:
            aligner, scanner = await asyncio.wait_for(
                asyncio.gather(self._aligner.load.remote(), self._scanner.load.remote()),
                self._options.shedding.sample_interval_s / 2,
            )
            self._last_load = LoadSample(**aligner, **scanner)
        except asyncio.TimeoutError:
            last = self._last_load
            if last is None:
                raise  # no capacities known yet: the shedder counts a failed probe
            self._last_load = dataclasses.replace(last, aligner_ongoing=last.aligner_capacity, aligner_queued=last.aligner_capacity)
        return self._last_load

    async def _redis_answers(self) -> bool:
        try:
            return bool(await self._gate.redis.ping())
        except Exception:  # any client error means "not answering"; the type is all we need
            return False

    async def _probe_dependencies(self) -> None:
        # Re-set periodically: a Ray gauge disappears from the export ~30 s after its last set().
        while True:
            metrics.DEPENDENCY_UP.set(1 if await self._redis_answers() else 0, tags={"dependency": "redis"})
            await asyncio.sleep(_DEPENDENCY_PROBE_INTERVAL_S)
