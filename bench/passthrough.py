"""A bare pass-through graph with the same three hops and resources as ours, for bench/service.py.

Ingress (FastAPI, reads the body) -> Scanner (returns the bytes as an array) -> Aligner
(@serve.batch, returns one timing per word). No validation, decoding or alignment: the latency of
this graph is what Serve's hops alone cost on this machine.
"""

from fastapi import FastAPI, Request
from ray import serve
from ray.serve.handle import DeploymentHandle

import numpy as np

app = FastAPI()


@serve.deployment(name="Scanner", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=4)
class BareScanner:
    async def inspect(self, upload: np.ndarray) -> np.ndarray:
        return upload


@serve.deployment(name="Aligner", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16)
class BareAligner:
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def align(self, payloads: list[np.ndarray]) -> list[list[tuple[str, float, float]]]:
        return [[("word", 0.0, payload.size / 16000)] for payload in payloads]


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
@serve.ingress(app)
class BareIngress:
    def __init__(self, scanner: DeploymentHandle, aligner: DeploymentHandle) -> None:
        self._scanner = scanner
        self._aligner = aligner

    @app.post("/v1/align")
    async def align(self, request: Request) -> dict:
        body = await request.body()
        audio = await self._scanner.inspect.remote(np.frombuffer(body, dtype=np.uint8))
        words = await self._aligner.align.remote(audio)
        return {"words": [{"text": text, "start": start, "end": end} for text, start, end in words]}


def build_app(args: dict) -> serve.Application:
    return BareIngress.bind(BareScanner.bind(), BareAligner.bind())
