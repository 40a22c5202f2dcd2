"""One file, aligned the way its length calls for: a request for a short clip, a job for the rest.

The length is read from the file's header where that is cheap and exact (WAV, FLAC); for other
formats the size decides. A clip the synchronous route refuses as too long or too large goes on
as a job. A job's Idempotency-Key is derived from what is aligned (audio bytes, transcript,
language, format), so running the same command again (an interrupted batch resumed) finds the job
it made before instead of making a second one; a job that ended failed on the service's side or
cancelled, or one that has expired since, is submitted afresh under a new key.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aligner_client.aio import AsyncClient
from aligner_client.errors import InvalidInput, JobFailed
from aligner_client.models import Alignment, JobInfo

SYNC_MAX_SECONDS = 120.0  # longer: a job, with progress, not one long request
SYNC_MAX_BYTES = 4 * 1024 * 1024  # unknown length: 2 min of 16 kHz WAV, 4 of 128 kbit/s MP3
_TOO_BIG_FOR_A_REQUEST = {"audio-too-long", "payload-too-large"}
EXTENSIONS = {"json": ".json", "srt": ".srt", "vtt": ".vtt", "textgrid": ".TextGrid"}


@dataclass(frozen=True)
class Aligned:
    document: str  # the output file's content
    audio_seconds: float | None  # None: a synchronous non-JSON answer of a file whose header gave no length
    job_id: str | None


def header_seconds(path: Path) -> float | None:
    """The duration a WAV or FLAC header states; None for other files or a header we cannot read."""
    try:
        with open(path, "rb") as file:
            head = file.read(64 * 1024)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return _wav_seconds(head, path.stat().st_size)
    if head[:4] == b"fLaC" and len(head) >= 26:
        info = int.from_bytes(head[18:26], "big")  # STREAMINFO: 20 bits rate, 3 channels, 5 bits/sample, 36 samples
        rate, samples = info >> 44, info & (2**36 - 1)
        return samples / rate if rate and samples else None
    return None


def _wav_seconds(head: bytes, file_size: int) -> float | None:
    offset, byte_rate = 12, 0
    while offset + 8 <= len(head):
        chunk, size = head[offset : offset + 4], struct.unpack("<I", head[offset + 4 : offset + 8])[0]
        if chunk == b"fmt " and offset + 16 <= len(head):
            byte_rate = struct.unpack("<I", head[offset + 16 : offset + 20])[0]
        if chunk == b"data":
            data = min(size, file_size - offset - 8)  # streamed WAVs say 0 or 0xFFFFFFFF
            if size in (0, 0xFFFFFFFF):
                data = file_size - offset - 8
            return data / byte_rate if byte_rate else None
        offset += 8 + size + (size & 1)
    return None


def wants_a_job(path: Path, mode: str) -> bool:
    if mode != "auto":
        return mode == "job"
    seconds = header_seconds(path)
    if seconds is not None:
        return seconds > SYNC_MAX_SECONDS
    return path.stat().st_size > SYNC_MAX_BYTES


def idempotency_key(path: Path, transcript: str, language: str | None, format: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    for part in (transcript, language or "", format):
        digest.update(b"\0" + hashlib.sha256(part.encode()).digest())
    return "forced-align-" + digest.hexdigest()


def rendered(result: Alignment | str) -> str:
    return json.dumps(result.to_json(), ensure_ascii=False) + "\n" if isinstance(result, Alignment) else result


async def align_file(
    client: AsyncClient,
    path: Path,
    transcript: str,
    language: str | None,
    format: str,
    mode: str = "auto",
    progress: Callable[[JobInfo], None] | None = None,
    poll_s: float = 1.0,
) -> Aligned:
    """Align `path`; the typed client errors (APIError, JobFailed, ConnectionFailed) say why not."""
    if not wants_a_job(path, mode):
        try:
            result = await client.align(path, transcript, language, format)
        except InvalidInput as refused:
            if mode == "sync" or refused.slug not in _TOO_BIG_FOR_A_REQUEST:
                raise
        else:
            seconds = result.duration if isinstance(result, Alignment) else header_seconds(path)
            return Aligned(rendered(result), seconds, None)
    key = idempotency_key(path, transcript, language, format)
    try:
        job = await client.submit(path, transcript, language, format, idempotency_key=key)
    except InvalidInput as refused:
        if refused.slug != "idempotency-key-reused":
            raise
        job = None  # the job this key made has expired (retention): the key means nothing now
    if job is not None:
        try:
            await job.wait(progress=progress, poll_s=poll_s)
        except JobFailed as failed:
            ours = failed.job.status == "cancelled" or (failed.problem is not None and failed.problem.status >= 500)
            if not (job.replayed and ours):
                raise
            job = None  # an earlier run's job that failed on the service's side: try again
    if job is None:
        job = await client.submit(path, transcript, language, format, idempotency_key=f"{key}-{uuid.uuid4().hex[:12]}")
        await job.wait(progress=progress, poll_s=poll_s)
    return Aligned(rendered(await job.result(format)), job.info.duration, job.id)
