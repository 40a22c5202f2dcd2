"""One alignment, from a spooled upload to the caller's words: scan -> charge -> window -> align -> stitch.

Two parts, the same behind both front doors: `AlignmentPipeline.intake` (scan, check, charge) and
`AudioAligner.align` (windows on the aligner, stitched). POST /v1/align runs both in one request
(`AlignmentPipeline.run`); POST /v1/jobs runs the intake at submission and the job runner
(serve_app.jobs.runner) the aligning, later, from the decoded audio the job keeps. No FastAPI and
no Serve here; what the pipeline needs from the outside is passed in:
- `Scan`: the Scanner deployment (clamd, sniff, capped streamed decode into the spool);
- `Align`: the Aligner deployment (one job: one window's audio and its units);
- `Ledger`: the caller's account and audit trail (serve_app.api.gate binds one to a caller).
Both calls answer 503 problems themselves when the deployment is down, saturated or slow.

Rendering (JSON, SRT, WebVTT, TextGrid: serve_app.text.formats) stays at the front door: the
pipeline's result is the words, which a job stores once and renders in whatever format it is
fetched in.

Large data stays on disk: the upload is a spool file (read by the scanner, removed once scanned)
and so is the decoded PCM (read window by window, removed when the alignment ends, whatever way),
so this process holds at most the windows in flight (serve_app.pipeline.windows: the walk's window
and a few refining segments).

Failure policy: every refusal is a Problem with today's types. The decoded audio seconds are
charged once, after every check on the input passed, and refunded when the alignment then fails on
our side (a 5xx: aligner down, backend failure); a 4xx after charging (a window that finds no
speech for its text) keeps the charge, as the work was done. A backend failure reason we do not
know is a 500, never a 422 blamed on the input. Nothing is half-done: a refused request leaves no
spool file and no charge.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
import dataclasses
from dataclasses import dataclass
from typing import Protocol

from deployments.backends.base import SAMPLE_RATE, AlignmentFailed, AlignmentJob, BackendFailed, BackendInfo, JobOutcome, UnitTiming
from serve_app import metrics
from serve_app.media import DecodedAudio
from serve_app.media.decode import read_samples
from serve_app.media.inspect import Rejection, ScanUnavailable, Verdict
from serve_app.media.spool import Spool, SpooledFile
from serve_app.pipeline.windows import Window, WindowSettings, align_windowed, mismatch
from serve_app.problems import PROBLEM_TYPES, Problem, unavailable
from serve_app.text.timing import Span, WordTiming, word_timings
from serve_app.text.transcript import Transcript, TranscriptRejected, check_plausible

logger = logging.getLogger("ray.serve")

MIN_AUDIO_SECONDS = 0.1  # shorter holds no alignable word (Qwen3's time grid is 80 ms)

Scan = Callable[[SpooledFile, float, float], Awaitable[Verdict]]
"""Scan and decode an upload, admitting at most that many decoded seconds; audio up to the second
figure long is also shared through the object store (DecodedAudio.shared), to reach the aligner directly."""
Align = Callable[[AlignmentJob], Awaitable[JobOutcome]]


class Ledger(Protocol):
    """The caller's side of one request: quota and audit (serve_app.api.gate.CallerLedger)."""

    async def charge_audio(self, seconds: float) -> None:
        """Take decoded seconds from the caller's quota; raises a 429/503 Problem when refused."""

    async def refund_audio(self, seconds: float) -> None:
        """Give back seconds charged for work that failed on our side (best effort)."""

    async def upload_refused(self, reason: str, signature: str | None) -> None:
        """Audit a refused upload (and count it toward a ban when hostile)."""

    def scan_recorded(self, outcome: str, reason: str, **fields: object) -> None:
        """Audit the scanner's verdict."""


@dataclass(frozen=True)
class AlignmentRequest:
    upload: SpooledFile  # the pipeline removes it once scanned
    upload_content_type: str | None  # declared by the client: audited, never trusted
    transcript: Transcript
    max_audio_seconds: float  # the longest decoded audio this route and plan admit


@dataclass
class WindowProgress:
    """How far one alignment has got: window jobs aligned, audio seconds located (of `total_seconds`)."""

    total_seconds: float
    windows: int = 0
    audio_seconds: float = 0.0


Progress = Callable[[WindowProgress], Awaitable[None]]


async def _no_progress(_: WindowProgress) -> None:
    return None


@dataclass(frozen=True)
class Alignment:
    words: list[WordTiming]
    duration: float  # decoded audio seconds


def alignment_problem(outcome: JobOutcome, retry_after_s: int) -> Problem | None:
    """The answer to a job the aligner did not align, None for timings.

    A backend failure is ours, not the input's: 503 when a retry may succeed (out of memory), else
    500; never the 422 of an input that cannot be aligned. An unknown reason is a backend bug.
    """
    if isinstance(outcome, BackendFailed):
        if outcome.transient:
            return unavailable("the aligner is short of memory; retry later", retry_after_s)
        return Problem("internal-error", "the aligner failed on this request")
    if isinstance(outcome, AlignmentFailed):
        problem = PROBLEM_TYPES.get(outcome.reason)
        if problem is None or problem.status != 422:
            logger.error("the aligner answered an unknown failure reason")
            return Problem("internal-error", "the aligner failed on this request")
        return Problem(outcome.reason, outcome.detail)
    return None


class AudioAligner:
    """Decoded audio and its transcript -> words, in windows on the aligner (the job runner's part too)."""

    def __init__(self, align: Align, backend: BackendInfo, retry_after_s: int, *, refine_concurrency: int | None = None) -> None:
        """`refine_concurrency`: segment jobs in flight per long file (default: windows.WindowSettings')."""
        self._align = align
        self.backend = backend
        self._windows = WindowSettings.for_backend(backend.max_audio_seconds, refine_concurrency)
        self._retry_after_s = retry_after_s

    @property
    def single_window_s(self) -> float:
        """The longest audio aligned as one window (one aligner job)."""
        return self._windows.max_window_s

    async def align(self, audio: DecodedAudio, transcript: Transcript, progress: Progress | None = None) -> Alignment:
        """Align checked, charged audio; `progress` hears of each window aligned. Leaves the PCM in place."""
        spans = await self._aligned(audio, transcript, progress or _no_progress)
        metrics.AUDIO_SECONDS.inc(audio.duration_seconds, tags={"backend": self.backend.name})
        words = word_timings(transcript, spans, audio.duration_seconds)
        return Alignment(words=words, duration=audio.duration_seconds)

    async def _aligned(self, audio: DecodedAudio, transcript: Transcript, progress: Progress) -> list[Span | None]:
        """A span per unit."""
        units = transcript.units
        windowed = audio.duration_seconds > self._windows.max_window_s
        done = WindowProgress(audio.duration_seconds)

        async def align_window(window: Window) -> Sequence[UnitTiming]:
            first, stop = round(window.start * SAMPLE_RATE), round(window.end * SAMPLE_RATE)
            whole = audio.shared is not None and (first, stop) == (0, audio.sample_count)
            samples = audio.shared if whole else read_samples(audio.pcm_path, first, stop)
            job = AlignmentJob(samples, tuple(units[window.first_unit : window.stop_unit]), transcript.language, draft=window.locating)
            outcome = await self._align(job)
            problem = alignment_problem(outcome, self._retry_after_s)
            if problem is not None:
                if windowed and problem.type.slug == "no-alignment-found":
                    raise mismatch(window)
                raise problem
            done.windows += 1
            await progress(done)
            return [dataclasses.replace(timing, start=timing.start + window.start, end=timing.end + window.start) for timing in outcome]

        def located(frontier_s: float) -> None:
            done.audio_seconds = frontier_s

        spans = await align_windowed(units, audio.duration_seconds, audio.envelope, self._windows, align_window, located)
        done.audio_seconds = audio.duration_seconds
        await progress(done)
        return spans


class AlignmentPipeline:
    """Intake (scan, check, charge) and then the AudioAligner: POST /v1/align, and job submissions' intake."""

    def __init__(self, scan: Scan, aligner: AudioAligner, spool: Spool, retry_after_s: int) -> None:
        self._scan = scan
        self.aligner = aligner
        self._spool = spool
        self._retry_after_s = retry_after_s

    async def run(self, request: AlignmentRequest, ledger: Ledger) -> Alignment:
        """The whole alignment behind POST /v1/align: intake, then align, refunding a failure of ours."""
        audio = await self.intake(request, ledger, share_up_to_s=self.aligner.single_window_s)
        try:
            try:
                with metrics.timed("align"):  # a request's stage: the whole alignment, however many windows it took
                    return await self.aligner.align(audio, request.transcript)
            except Exception as failure:
                if not isinstance(failure, Problem) or failure.type.status >= 500:
                    await ledger.refund_audio(audio.duration_seconds)
                raise
        finally:
            self._spool.remove(audio.pcm_path)

    async def intake(self, request: AlignmentRequest, ledger: Ledger, share_up_to_s: float = 0.0) -> DecodedAudio:
        """Scan, check and charge: the decoded audio, the caller's to align and then remove.

        The upload is removed whatever happens; the decoded PCM too, unless this returns it. Audio
        up to `share_up_to_s` long comes shared through the object store as well (aligned at once,
        so worth it; a job's audio waits in the job spool instead).
        """
        try:
            audio = await self._scanned(request, ledger, share_up_to_s)
        finally:
            self._spool.remove(request.upload)  # decoded or refused, the upload is no longer needed
        try:
            self._check(audio, request)
            # Charged only once the request will be worked on; the caller of align() gives it back
            # when that work fails on our side (a 5xx): a caller pays for alignments, not for
            # refusals or our outages.
            await ledger.charge_audio(audio.duration_seconds)
        except BaseException:
            self._spool.remove(audio.pcm_path)
            raise
        return audio

    async def _scanned(self, request: AlignmentRequest, ledger: Ledger, share_up_to_s: float) -> DecodedAudio:
        with metrics.timed("scan"):
            verdict = await self._scan(request.upload, request.max_audio_seconds, share_up_to_s)
        if isinstance(verdict, ScanUnavailable):
            metrics.DEPENDENCY_ERRORS.inc(tags={"dependency": "clamd", "use": "scan"})
            ledger.scan_recorded("unavailable", verdict.reason)
            raise unavailable("the malware scanner is unavailable; retry later", self._retry_after_s)
        if isinstance(verdict, Rejection):
            await ledger.upload_refused(verdict.reason, verdict.signature)
            raise Problem(verdict.reason, verdict.detail)
        ledger.scan_recorded(
            "allowed", "clean",
            upload_bytes=request.upload.size, decoded_seconds=round(verdict.duration_seconds, 3), container=verdict.container,
            declared_type=request.upload_content_type,
        )  # fmt: skip
        return verdict

    @staticmethod
    def _check(audio: DecodedAudio, request: AlignmentRequest) -> None:
        if audio.duration_seconds < MIN_AUDIO_SECONDS:
            raise Problem("audio-too-short", f"the audio lasts {audio.duration_seconds:.3f} s; at least {MIN_AUDIO_SECONDS} s is needed")
        if audio.duration_seconds > request.max_audio_seconds:
            raise Problem(
                "audio-too-long", f"the audio lasts {audio.duration_seconds:.1f} s; at most {request.max_audio_seconds:g} s is admitted here"
            )
        try:
            check_plausible(request.transcript, audio.duration_seconds)
        except TranscriptRejected as rejected:
            raise Problem(rejected.reason, rejected.detail) from None
