"""`forced-align batch`: a folder of audio files, each with its transcript, into a folder of outputs.

Files pair by name: AUDIO_DIR/talk.flac with TRANSCRIPTS/talk.txt gives OUT/talk.srt. An output
that exists is skipped, and outputs are written whole or not at all (a temporary file renamed), so
a batch that was interrupted is resumed by running it again; its jobs still in the service are
found again by their Idempotency-Key (routing.py). One file failing never stops the others.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from aligner_client.aio import AsyncClient
from aligner_client.cli.display import Display
from aligner_client.cli.routing import EXTENSIONS, align_file
from aligner_client.errors import AlignerError, APIError, JobFailed

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".mp4", ".webm"}


@dataclass(frozen=True)
class Pair:
    audio: Path
    transcript: Path
    output: Path


def pairs(audio_dir: Path, transcript_dir: Path, out_dir: Path, format: str) -> list[Pair]:
    files = sorted(path for path in audio_dir.iterdir() if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES and not path.name.startswith("."))
    return [Pair(path, transcript_dir / f"{path.stem}.txt", out_dir / f"{path.stem}{EXTENSIONS[format]}") for path in files]


def why(error: Exception) -> str:
    """A failure as one line for the summary: the problem's title and detail, never a traceback."""
    if isinstance(error, JobFailed) and error.problem is not None:
        return f"{error.problem.title}: {error.problem.detail}"
    if isinstance(error, APIError):
        return f"{error.title}: {error.detail}" if error.detail else error.title
    return str(error)


def read_transcript(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not text
    except FileNotFoundError:
        raise AlignerError(f"no transcript {path.name}") from None
    except UnicodeDecodeError:
        raise AlignerError(f"the transcript {path.name} is not UTF-8 text") from None
    if not text.strip():
        raise AlignerError(f"the transcript {path.name} is empty")
    return text


def write_whole(path: Path, document: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(document, encoding="utf-8")
    os.replace(partial, path)


async def run_batch(
    client: AsyncClient, work: list[Pair], display: Display, *, language: str | None, format: str, mode: str, concurrency: int, poll_s: float
) -> None:
    slots = asyncio.Semaphore(concurrency)
    writers: dict[Path, list[str]] = {}
    for pair in work:
        writers.setdefault(pair.output, []).append(pair.audio.name)

    async def one(pair: Pair) -> None:
        name = pair.audio.name
        if len(writers[pair.output]) > 1:  # talk.wav and talk.mp3 would both write talk.srt: neither is guessed at
            display.failed(name, f"{' and '.join(writers[pair.output])} would both write {pair.output.name}; rename one")
            return
        if pair.output.exists():
            display.skipped(name, f"{pair.output} exists")
            return
        async with slots:
            try:
                transcript = read_transcript(pair.transcript)
                aligned = await align_file(
                    client, pair.audio, transcript, language, format, mode, progress=lambda info: display.job_progress(name, info), poll_s=poll_s
                )
                write_whole(pair.output, aligned.document)
            except (AlignerError, OSError) as error:
                display.failed(name, why(error))
                return
        display.done(name, str(pair.output), aligned.audio_seconds)

    await asyncio.gather(*(one(pair) for pair in work))
