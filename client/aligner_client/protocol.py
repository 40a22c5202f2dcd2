"""API v1 as operations that say what to send and when to wait, with no I/O of their own.

Each operation is a generator: it yields a `Call` (an HTTP request to make) or a `Sleep`, is sent
back the `httpx.Response` or `httpx.TransportError` a call ended with, and returns its typed
result. The synchronous client (`aligner_client.sync`) and the asyncio one (`aligner_client.aio`)
each drive these with their own httpx client and sleep: retries, polling and parsing are written
once, here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union
from urllib.parse import quote

import httpx

from aligner_client.errors import APIError, ConnectionFailed, JobFailed, WaitTimedOut, error_for
from aligner_client.models import Alignment, JobInfo, JobPage, Problem
from aligner_client.retry import RETRIED_STATUSES, RetryPolicy, parse_retry_after

_T = TypeVar("_T")
FORMATS = ("json", "srt", "vtt", "textgrid")


@dataclass(frozen=True)
class Upload:
    """The audio of a request: a file (streamed from disk, opened again for every attempt) or bytes."""

    source: Path | bytes = field(repr=False)
    filename: str

    @contextmanager
    def opened(self) -> Iterator[Any]:
        if isinstance(self.source, bytes):
            yield self.source
        else:
            with open(self.source, "rb") as file:
                yield file


def upload_of(audio: str | os.PathLike | bytes, filename: str | None = None) -> Upload:
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return Upload(bytes(audio), filename or "audio")
    path = Path(audio)
    if not path.is_file():
        raise FileNotFoundError(f"no such audio file: {path}")
    return Upload(path, filename or path.name)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    params: dict[str, str] | None = None
    fields: dict[str, str] | None = None
    upload: Upload | None = None
    headers: dict[str, str] = field(default_factory=dict)
    retry_in_use: bool = False  # job submission: 409 idempotency-key-in-use means "the first try is still arriving"

    @contextmanager
    def request(self) -> Iterator[dict[str, Any]]:
        """The keyword arguments of httpx's `request()`, the upload open for the length of one attempt."""
        arguments: dict[str, Any] = {"method": self.method, "url": self.path, "params": self.params, "headers": self.headers}
        if self.upload is None:
            yield arguments
            return
        with self.upload.opened() as audio:
            yield {**arguments, "data": self.fields, "files": {"audio": (self.upload.filename, audio, "application/octet-stream")}}


@dataclass(frozen=True)
class Sleep:
    seconds: float


Reply = Union[httpx.Response, httpx.TransportError, None]
Operation = Generator[Union[Call, Sleep], Reply, _T]


def exchange(call: Call, policy: RetryPolicy) -> Operation[httpx.Response]:
    """Make `call`, retried as `policy` says; its successful response, or the typed error."""
    attempt = 0
    while True:
        reply = yield call
        attempt += 1
        if isinstance(reply, httpx.TransportError):
            if attempt >= policy.attempts:
                raise ConnectionFailed(f"{call.method} {call.path}: {type(reply).__name__} on each of {attempt} attempts") from reply
            yield Sleep(policy.delay(attempt, None))
            continue
        assert isinstance(reply, httpx.Response)
        if reply.is_success:
            return reply
        error = error_of(reply)
        if attempt < policy.attempts and _retried(error, call):
            yield Sleep(policy.delay(attempt, error.retry_after_s))
            continue
        raise error


def _retried(error: APIError, call: Call) -> bool:
    return error.status in RETRIED_STATUSES or (call.retry_in_use and error.slug == "idempotency-key-in-use")


def error_of(response: httpx.Response) -> APIError:
    """The response's problem document as an exception (a proxy's HTML error page gets its status line)."""
    problem = None
    if response.headers.get("content-type", "").split(";")[0].strip() in ("application/problem+json", "application/json"):
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "title" in body:
            problem = Problem.from_json({"status": response.status_code, **body})
    if problem is None:
        problem = Problem("about:blank", response.reason_phrase or "HTTP error", response.status_code, "")
    return error_for(problem, parse_retry_after(response.headers.get("retry-after")))


def _job_path(job_id: str, suffix: str = "") -> str:
    return f"/v1/jobs/{quote(job_id, safe='')}{suffix}"


def _alignment_fields(transcript: str, language: str | None, format: str) -> dict[str, str]:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    if not transcript.strip():
        raise ValueError("the transcript is empty")
    fields = {"text": transcript, "format": format}
    if language:
        fields["language"] = language
    return fields


def _rendered(response: httpx.Response, format: str) -> Alignment | str:
    return Alignment.from_json(response.json()) if format == "json" else response.text


def align(audio: Upload, transcript: str, language: str | None, format: str, policy: RetryPolicy) -> Operation[Alignment | str]:
    call = Call("POST", "/v1/align", fields=_alignment_fields(transcript, language, format), upload=audio)
    return _rendered((yield from exchange(call, policy)), format)


def submit(
    audio: Upload, transcript: str, language: str | None, format: str, idempotency_key: str, policy: RetryPolicy
) -> Operation[tuple[JobInfo, bool]]:
    """The job (and whether the service answered with the one this key already made)."""
    call = Call(
        "POST", "/v1/jobs", fields=_alignment_fields(transcript, language, format), upload=audio,
        headers={"Idempotency-Key": idempotency_key}, retry_in_use=True,
    )  # fmt: skip
    response = yield from exchange(call, policy)
    return JobInfo.from_json(response.json()), response.headers.get("idempotent-replayed") == "true"


def job(job_id: str, policy: RetryPolicy) -> Operation[JobInfo]:
    return JobInfo.from_json((yield from exchange(Call("GET", _job_path(job_id)), policy)).json())


def wait(
    job_id: str, policy: RetryPolicy, progress: Callable[[JobInfo], None] | None, poll_s: float, timeout_s: float | None, clock: Callable[[], float]
) -> Operation[JobInfo]:
    """Poll until the job ends: its info if it succeeded, JobFailed if not, WaitTimedOut past `timeout_s`.
    `progress` is called with each new state seen (the first one included)."""
    if poll_s <= 0:
        raise ValueError("poll_s must be > 0")
    deadline = None if timeout_s is None else clock() + timeout_s
    seen = None
    while True:
        info = yield from job(job_id, policy)
        if progress is not None and info != seen:
            progress(info)
        seen = info
        if info.ended:
            if info.status != "succeeded":
                raise JobFailed(info)
            return info
        if deadline is not None and clock() >= deadline:
            raise WaitTimedOut(info, timeout_s)
        yield Sleep(poll_s if deadline is None else max(min(poll_s, deadline - clock()), 0.0))


def result(job_id: str, format: str | None, policy: RetryPolicy) -> Operation[Alignment | str]:
    """A succeeded job's words in `format` (default: the one it was submitted with)."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    response = yield from exchange(Call("GET", _job_path(job_id, "/result"), params={"format": format} if format else None), policy)
    is_json = response.headers.get("content-type", "").startswith("application/json")
    return Alignment.from_json(response.json()) if is_json else response.text


def jobs_page(status: str | None, limit: int | None, cursor: str | None, policy: RetryPolicy) -> Operation[JobPage]:
    params = {name: str(value) for name, value in (("status", status), ("limit", limit), ("cursor", cursor)) if value is not None}
    return JobPage.from_json((yield from exchange(Call("GET", "/v1/jobs", params=params or None), policy)).json())


def cancel(job_id: str, policy: RetryPolicy) -> Operation[JobInfo | None]:
    """Cancel a queued or running job (its info after), or delete an ended one (None)."""
    response = yield from exchange(Call("DELETE", _job_path(job_id)), policy)
    return None if response.status_code == 204 else JobInfo.from_json(response.json())


def connection_options(base_url: str | None, api_key: str | None, timeout: httpx.Timeout | float, user_agent: str) -> dict[str, Any]:
    """What both flavours give their httpx client: where, who, how long."""
    base_url = base_url or os.environ.get("FORCED_ALIGNER_URL") or "http://127.0.0.1:8000"
    api_key = api_key or os.environ.get("FORCED_ALIGNER_API_KEY")
    if not api_key:
        raise ValueError("no API key: pass api_key= or set FORCED_ALIGNER_API_KEY")
    return {
        "base_url": base_url,
        "headers": {"Authorization": f"Bearer {api_key.strip()}", "User-Agent": user_agent},
        "timeout": timeout,
    }
