"""A bare pass-through graph with the same three hops and resources as ours, for bench/service.py.

Ingress (FastAPI, parses the multipart form) -> Scanner (reads the WAV into an array: no clamd, no
sniffing, no caps) -> Aligner (the same continuous batcher as ours, deployments.batching). No
authentication, limits, validation, windows or rendering: the latency of this graph is what Serve's
hops alone cost on this machine. Its `backend` argument:
- "none": the aligner answers one made-up timing per job (Serve's floor);
- "pocketsphinx": the aligner runs the PocketSphinx backend on the batches, exactly as ours would
  (the throughput our graph is compared with at concurrency 8).
"""

import asyncio
import io

import soundfile
from fastapi import FastAPI, Request
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.aligner import audio_seconds, batch_limits
from deployments.backends.base import AlignmentJob, JobOutcome, UnitTiming
from deployments.batching import ContinuousBatcher
from serve_app.settings import AlignerOptions

app = FastAPI()


@serve.deployment(name="Scanner", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=4)
class BareScanner:
    async def inspect(self, upload: bytes):
        samples, _ = soundfile.read(io.BytesIO(upload), dtype="float32")
        return samples


@serve.deployment(name="Aligner", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16)
class BareAligner:
    def __init__(self, backend: str) -> None:
        from deployments.backends.pocketsphinx import PocketSphinxBackend

        self._backend = PocketSphinxBackend() if backend == "pocketsphinx" else None
        self._batcher = ContinuousBatcher(self._run, audio_seconds, batch_limits(AlignerOptions()))

    async def align(self, job: AlignmentJob) -> JobOutcome:
        return await self._batcher.submit(job)

    async def _run(self, jobs: list[AlignmentJob]) -> list[JobOutcome]:
        if self._backend is None:
            return [[UnitTiming(job.units[0], 0.0, audio_seconds(job), 1.0)] for job in jobs]
        return await asyncio.to_thread(self._backend.align_batch, jobs)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
@serve.ingress(app)
class BareIngress:
    def __init__(self, scanner: DeploymentHandle, aligner: DeploymentHandle) -> None:
        self._scanner = scanner
        self._aligner = aligner

    @app.post("/v1/align")
    async def align(self, request: Request) -> dict:
        form = await request.form()
        audio = await self._scanner.inspect.remote(await form["audio"].read())
        units = tuple(str(form["text"]).split())
        timings = await self._aligner.align.remote(AlignmentJob(audio, units, "English"))
        return {"words": [{"text": timing.text, "start": timing.start, "end": timing.end} for timing in timings]}


def build_app(args: dict) -> serve.Application:
    return BareIngress.bind(BareScanner.bind(), BareAligner.bind(args.get("backend", "none")))
