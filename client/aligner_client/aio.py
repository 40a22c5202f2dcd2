"""The asyncio client: `AsyncClient` and its `AsyncJob` handles, the same methods as
`aligner_client.sync`, awaited. The protocol operations are the same ones, driven with
httpx.AsyncClient and asyncio.sleep."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable

import httpx

from aligner_client import protocol
from aligner_client.models import Alignment, JobInfo
from aligner_client.protocol import Call, Operation
from aligner_client.retry import RetryPolicy
from aligner_client.version import DEFAULT_TIMEOUT, USER_AGENT

Audio = str | os.PathLike | bytes


class AsyncClient:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = RetryPolicy(),
        max_connections: int = 16,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = retry
        self._http = httpx.AsyncClient(
            **protocol.connection_options(base_url, api_key, timeout, USER_AGENT),
            limits=httpx.Limits(max_connections=max_connections), transport=transport,
        )  # fmt: skip

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def run(self, operation: Operation):
        reply = None
        while True:
            try:
                step = operation.send(reply)
            except StopIteration as done:
                return done.value
            if isinstance(step, Call):
                with step.request() as arguments:
                    try:
                        reply = await self._http.request(**arguments)
                    except httpx.TransportError as error:
                        reply = error
            else:
                await asyncio.sleep(step.seconds)
                reply = None

    async def align(self, audio: Audio, transcript: str, language: str | None = None, format: str = "json") -> Alignment | str:
        return await self.run(protocol.align(protocol.upload_of(audio), transcript, language, format, self.retry))

    async def submit(
        self, audio: Audio, transcript: str, language: str | None = None, format: str = "json", idempotency_key: str | None = None
    ) -> "AsyncJob":
        key = idempotency_key or uuid.uuid4().hex
        info, replayed = await self.run(protocol.submit(protocol.upload_of(audio), transcript, language, format, key, self.retry))
        return AsyncJob(self, info, replayed)

    async def job(self, job_id: str) -> "AsyncJob":
        return AsyncJob(self, await self.run(protocol.job(job_id, self.retry)), replayed=False)

    async def jobs(self, status: str | None = None, page_size: int | None = None) -> AsyncIterator[JobInfo]:
        cursor = None
        while True:
            page = await self.run(protocol.jobs_page(status, page_size, cursor, self.retry))
            for info in page.jobs:
                yield info
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, job_id: str) -> JobInfo | None:
        return await self.run(protocol.cancel(job_id, self.retry))


class AsyncJob:
    def __init__(self, client: AsyncClient, info: JobInfo, replayed: bool) -> None:
        self.client, self.info, self.replayed = client, info, replayed

    @property
    def id(self) -> str:
        return self.info.id

    async def refresh(self) -> JobInfo:
        self.info = await self.client.run(protocol.job(self.id, self.client.retry))
        return self.info

    async def wait(self, progress: Callable[[JobInfo], None] | None = None, poll_s: float = 1.0, timeout_s: float | None = None) -> JobInfo:
        self.info = await self.client.run(protocol.wait(self.id, self.client.retry, progress, poll_s, timeout_s, time.monotonic))
        return self.info

    async def result(self, format: str | None = None) -> Alignment | str:
        return await self.client.run(protocol.result(self.id, format, self.client.retry))

    async def cancel(self) -> JobInfo | None:
        return await self.client.cancel(self.id)
