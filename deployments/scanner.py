"""Scanner deployment: the isolation boundary for everything that parses untrusted bytes.

Each upload (a spool file the ingress wrote) is streamed to clamd, sniffed with libmagic and decoded
with hard caps to 16 kHz mono PCM in another spool file (serve_app.media.inspect), in this
deployment's own CPU replicas: a decoder blow-up costs a scanner replica, which Serve replaces,
never the ingress or an aligner. Nothing is held whole in memory: clamd and the decoder read the
upload in chunks, and the decoder writes as it goes. The caps scale with the audio the request may
hold (`max_audio_seconds`, the ingress's route and plan limit). The answer is a verdict value
(accepted audio, with where its PCM is, a rejection, or "clamd unavailable"), never an exception
for bad input.

Decoded audio short enough to be aligned as one window (`share_up_to_s`, the ingress's call) is
also put into Ray's object store, once, as int16 (`DecodedAudio.shared`): the ingress passes the
reference on, and the aligner reads the samples straight from the store, so they cross one hop
instead of two. The spool file stays the source for windows and jobs. Should the put fail (store
full), the audio is simply not shared (the pipeline reads the spool file); should this replica die
while its shared audio is in use, the aligner's read fails, a 503 like any dead replica.

Failure policy: clamd down or erroring -> `ScanUnavailable`, which the ingress answers with 503 +
Retry-After (fail closed), counted as aligner_scanner_verdicts{verdict="unavailable"}; each scan
opens a new connection, so service resumes by itself when clamd is back. A scan whose caller gave
up keeps its slot until its thread ends (bounded by max_decode_wall_seconds and clamd_timeout_s),
and the PCM it decoded is removed then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os

import ray
from ray import serve

from deployments.backends.base import SharedPcm
from deployments.probe_access_log import quiet_probe_access_logs
from serve_app import metrics
from serve_app.media import DecodedAudio
from serve_app.media.clamav import ClamdScanner
from serve_app.media.decode import read_pcm
from serve_app.media.inspect import Rejection, ScanUnavailable, Verdict, decode_limits, inspect_upload
from serve_app.media.spool import Spool, SpooledFile
from serve_app.settings import Environment, ScannerOptions

logger = logging.getLogger("ray.serve")

_CLAMD_PROBE_INTERVAL_S = 5.0


@serve.deployment(
    name="Scanner",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=4,
    max_queued_requests=32,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2},
    user_config=ScannerOptions().model_dump(),
)
class Scanner:
    def __init__(self) -> None:
        metrics.label_with_replica()
        quiet_probe_access_logs("load", "ready", "spool_volume")  # the ingress probes these every second or two
        environment = Environment.from_env()
        self._clamd_address = environment.clamd_address
        self._spool = Spool(environment.spool_dir)
        self._in_flight = 0
        self._probe = asyncio.get_running_loop().create_task(self._probe_clamd())

    def reconfigure(self, user_config: dict) -> None:
        # Serve always calls this before the first request (user_config has a default above).
        self._options = options = ScannerOptions.model_validate(user_config)
        self._clamd = ClamdScanner(self._clamd_address, options.clamd_timeout_s)
        # Bounds the decodes (and their memory) running at once in this replica, whatever
        # max_ongoing_requests lets in; it is also the capacity the shedder compares load with.
        self._capacity = options.max_concurrent_scans
        self._slots = asyncio.Semaphore(options.max_concurrent_scans)

    async def inspect(self, upload: SpooledFile, max_audio_seconds: float, share_up_to_s: float = 0.0) -> Verdict:
        """Scan and decode one spooled upload, admitting at most `max_audio_seconds`; decoded audio
        up to `share_up_to_s` long is shared through the object store too. Runs in a worker thread: it blocks."""
        self._in_flight += 1
        slots = self._slots  # the semaphore this scan holds, even if reconfigure() replaces it
        try:
            await slots.acquire()
        except BaseException:  # cancelled while waiting: it never held a slot
            self._in_flight -= 1
            raise
        # A thread cannot be stopped: if the caller gives up (the ingress's scan timeout cancels
        # this call) the decode runs on until its own wall-time cap. Its slot and its place in the
        # backlog are given back when the thread really ends, so a replica never decodes more
        # than max_concurrent_scans uploads at once, and the shedder sees that work.
        limits = decode_limits(self._options, max_audio_seconds)
        scan = asyncio.ensure_future(asyncio.to_thread(inspect_upload, upload, self._clamd, limits, self._spool))
        scan.add_done_callback(lambda finished: self._scan_ended(finished, slots))
        try:
            verdict = await asyncio.shield(scan)
        except asyncio.CancelledError:  # nobody will read the PCM this scan writes: remove it when it ends
            scan.add_done_callback(self._discard_unclaimed)
            raise
        if isinstance(verdict, ScanUnavailable):
            metrics.SCANNER_VERDICTS.inc(tags={"verdict": "unavailable"})
            metrics.DEPENDENCY_ERRORS.inc(tags={"dependency": "clamd", "use": "scan"})
        elif isinstance(verdict, Rejection):
            malware = verdict.reason == "malware-detected"
            metrics.SCANNER_VERDICTS.inc(tags={"verdict": "malware" if malware else "rejected"})
            if not malware:
                metrics.DECODE_REJECTIONS.inc(tags={"reason": verdict.reason})
        else:
            metrics.SCANNER_VERDICTS.inc(tags={"verdict": "clean"})
            if verdict.duration_seconds <= share_up_to_s:
                return self._shared(verdict)
        return verdict

    @staticmethod
    def _shared(verdict: DecodedAudio) -> DecodedAudio:
        # In the replica's event loop, not the scan's thread: a put from a thread of its own cost ~3 ms.
        try:
            shared = SharedPcm((ray.put(read_pcm(verdict.pcm_path)),), verdict.sample_count)
        except Exception as error:  # the object store is full, say: the aligner gets the samples the longer way
            logger.warning("decoded audio not shared through the object store: %s", type(error).__name__)
            return verdict
        return dataclasses.replace(verdict, shared=shared)

    def _scan_ended(self, scan: asyncio.Future, slots: asyncio.Semaphore) -> None:
        slots.release()
        self._in_flight -= 1
        if not scan.cancelled():
            scan.exception()  # retrieved here too: a scan whose caller left must not log "never retrieved"

    def _discard_unclaimed(self, scan: asyncio.Future) -> None:
        if not scan.cancelled() and scan.exception() is None and isinstance(scan.result(), DecodedAudio):
            self._spool.remove(scan.result().pcm_path)

    async def load(self) -> dict[str, int]:
        return {"scanner_backlog": self._in_flight, "scanner_capacity": self._capacity}

    async def ready(self) -> bool:
        """Readiness: clamd answers (without it every upload is refused)."""
        return await asyncio.to_thread(self._clamd.ping)

    async def spool_volume(self) -> str:
        """The mark of the spool this replica reads uploads from (the ingress checks it is its own)."""
        return self._spool.volume

    async def pid(self) -> int:
        """This replica's process id (the crash-isolation test kills it)."""
        return os.getpid()

    async def _probe_clamd(self) -> None:
        # Re-set periodically: a Ray gauge disappears from the export ~30 s after its last set().
        while True:
            await asyncio.sleep(_CLAMD_PROBE_INTERVAL_S)  # first: reconfigure() has built the client
            up = await asyncio.to_thread(self._clamd.ping)
            metrics.DEPENDENCY_UP.set(1 if up else 0, tags={"dependency": "clamd"})
