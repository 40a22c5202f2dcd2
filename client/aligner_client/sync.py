"""The synchronous client: `Client` and the `Job` handles it returns.

    with Client("https://align.example", api_key=...) as client:
        words = client.align("clip.wav", "the transcript").words
        job = client.submit("lecture.flac", transcript, format="srt")
        job.wait(progress=lambda info: print(info.progress.fraction))
        subtitles = job.result()

Every method is an operation of `aligner_client.protocol` driven with httpx.Client and time.sleep.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator

import httpx

from aligner_client import protocol
from aligner_client.models import Alignment, JobInfo
from aligner_client.protocol import Call, Operation
from aligner_client.retry import RetryPolicy
from aligner_client.version import DEFAULT_TIMEOUT, USER_AGENT

Audio = str | os.PathLike | bytes


class Client:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = RetryPolicy(),
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """`base_url` default: $FORCED_ALIGNER_URL, else http://127.0.0.1:8000; `api_key` default:
        $FORCED_ALIGNER_API_KEY. `timeout`: httpx's (connect, read, write, pool), per attempt."""
        self.retry = retry
        self._http = httpx.Client(**protocol.connection_options(base_url, api_key, timeout, USER_AGENT), transport=transport)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def run(self, operation: Operation):
        """Drive one protocol operation to its end: its calls made, its sleeps slept."""
        reply = None
        while True:
            try:
                step = operation.send(reply)
            except StopIteration as done:
                return done.value
            if isinstance(step, Call):
                with step.request() as arguments:
                    try:
                        reply = self._http.request(**arguments)
                    except httpx.TransportError as error:
                        reply = error
            else:
                time.sleep(step.seconds)
                reply = None

    def align(self, audio: Audio, transcript: str, language: str | None = None, format: str = "json") -> Alignment | str:
        """Align a clip in one request (POST /v1/align): an Alignment for json, the document's text otherwise."""
        return self.run(protocol.align(protocol.upload_of(audio), transcript, language, format, self.retry))

    def submit(
        self, audio: Audio, transcript: str, language: str | None = None, format: str = "json", idempotency_key: str | None = None
    ) -> "Job":
        """Queue a job (POST /v1/jobs). Retries carry one Idempotency-Key, so they never make a second job."""
        key = idempotency_key or uuid.uuid4().hex
        info, replayed = self.run(protocol.submit(protocol.upload_of(audio), transcript, language, format, key, self.retry))
        return Job(self, info, replayed)

    def job(self, job_id: str) -> "Job":
        return Job(self, self.run(protocol.job(job_id, self.retry)), replayed=False)

    def jobs(self, status: str | None = None, page_size: int | None = None) -> Iterator[JobInfo]:
        """The caller's jobs, newest first, page after page."""
        cursor = None
        while True:
            page = self.run(protocol.jobs_page(status, page_size, cursor, self.retry))
            yield from page.jobs
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str) -> JobInfo | None:
        """Cancel a queued or running job (its info after), or delete an ended one (None)."""
        return self.run(protocol.cancel(job_id, self.retry))


class Job:
    """A job in the service; `info` is its state as last read."""

    def __init__(self, client: Client, info: JobInfo, replayed: bool) -> None:
        self.client, self.info, self.replayed = client, info, replayed

    @property
    def id(self) -> str:
        return self.info.id

    def refresh(self) -> JobInfo:
        self.info = self.client.run(protocol.job(self.id, self.client.retry))
        return self.info

    def wait(self, progress: Callable[[JobInfo], None] | None = None, poll_s: float = 1.0, timeout_s: float | None = None) -> JobInfo:
        """Until the job ends: its info when it succeeded; JobFailed when it failed or was cancelled,
        WaitTimedOut past `timeout_s` (the job goes on)."""
        self.info = self.client.run(protocol.wait(self.id, self.client.retry, progress, poll_s, timeout_s, time.monotonic))
        return self.info

    def result(self, format: str | None = None) -> Alignment | str:
        return self.client.run(protocol.result(self.id, format, self.client.retry))

    def cancel(self) -> JobInfo | None:
        return self.client.cancel(self.id)
