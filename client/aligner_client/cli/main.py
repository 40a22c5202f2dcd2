"""forced-align: align audio files with their transcripts through the forced-alignment service.

    forced-align FILE --text TRANSCRIPT.txt [--language de] [--format srt] [-o OUT]
    forced-align batch AUDIO_DIR --transcripts DIR --out DIR [--format srt] [--concurrency 4]
    forced-align jobs list|show|cancel|result ...

The API key comes from $FORCED_ALIGNER_API_KEY or --api-key-file, never from the command line
(where other users and the shell history would see it); the service from --url or
$FORCED_ALIGNER_URL. Exit status: 0 all done, 1 something failed, 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

import httpx

from aligner_client.aio import AsyncClient
from aligner_client.cli.batch import pairs, read_transcript, run_batch, why, write_whole
from aligner_client.cli.display import Display, JsonDisplay, TerminalDisplay, display_for
from aligner_client.cli.routing import align_file, rendered
from aligner_client.errors import AlignerError
from aligner_client.protocol import FORMATS
from aligner_client.version import DEFAULT_TIMEOUT

FAILED, USAGE, INTERRUPTED = 1, 2, 130


class UsageError(Exception):
    pass


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("FORCED_ALIGNER_URL", "http://127.0.0.1:8000"), help="the service (default: $FORCED_ALIGNER_URL or http://127.0.0.1:8000)")
    common.add_argument("--api-key-file", type=Path, help="a file holding the API key (default: $FORCED_ALIGNER_API_KEY)")
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT.read, help="seconds to wait for one answer (default %(default)g)")
    common.add_argument("--poll", type=float, default=1.0, help="seconds between looks at a running job (default %(default)g)")
    common.add_argument("--quiet", action="store_true", help="print failures only")
    common.add_argument("--json", action="store_true", help="print one JSON object per file and a summary, for scripts")
    return common


def _alignment_options(parser: argparse.ArgumentParser, default_format: str) -> None:
    parser.add_argument("--language", help="name or ISO code (default: the service's, English)")
    parser.add_argument("--format", choices=FORMATS, default=default_format, help="output format (default %(default)s)")
    parser.add_argument("--mode", choices=("auto", "sync", "job"), default="auto", help="auto: one request for a short clip, a job for longer audio")


def parsers() -> dict[str, argparse.ArgumentParser]:
    common = _common()
    single = argparse.ArgumentParser(prog="forced-align", parents=[common], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    single.add_argument("file", type=Path, help="the audio file")
    single.add_argument("--text", required=True, help="the transcript file (UTF-8; - for stdin)")
    single.add_argument("-o", "--output", type=Path, help="write here (default: stdout)")
    _alignment_options(single, "json")

    batch = argparse.ArgumentParser(prog="forced-align batch", parents=[common], description="Align every audio file of a folder with its NAME.txt transcript.")
    batch.add_argument("audio_dir", type=Path)
    batch.add_argument("--transcripts", type=Path, required=True, help="the folder of NAME.txt transcripts")
    batch.add_argument("--out", type=Path, required=True, help="the folder outputs go to (existing ones are skipped)")
    batch.add_argument("--concurrency", type=int, default=4, help="files in flight at once (default %(default)s)")
    _alignment_options(batch, "srt")

    jobs = argparse.ArgumentParser(prog="forced-align jobs", description="Your jobs in the service.")
    actions = jobs.add_subparsers(dest="action", required=True)  # each takes the common options after it
    listing = actions.add_parser("list", parents=[common], help="newest first")
    listing.add_argument("--status", choices=("queued", "running", "succeeded", "failed", "cancelled"))
    listing.add_argument("--limit", type=int, default=20)
    for name, summary in (("show", "one job's state"), ("cancel", "cancel a queued or running job; delete an ended one")):
        actions.add_parser(name, parents=[common], help=summary).add_argument("job_id")
    result = actions.add_parser("result", parents=[common], help="a succeeded job's output")
    result.add_argument("job_id")
    result.add_argument("--format", choices=FORMATS)
    result.add_argument("-o", "--output", type=Path)
    return {"single": single, "batch": batch, "jobs": jobs}


def api_key(args: argparse.Namespace) -> str:
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read the API key file: {type(error).__name__}") from None
    else:
        key = os.environ.get("FORCED_ALIGNER_API_KEY", "").strip()
    if not key:
        raise UsageError("no API key: set FORCED_ALIGNER_API_KEY or pass --api-key-file")
    return key


def client_for(args: argparse.Namespace, connections: int) -> AsyncClient:
    timeout = httpx.Timeout(connect=DEFAULT_TIMEOUT.connect, read=args.timeout, write=args.timeout, pool=args.timeout)
    return AsyncClient(args.url, api_key(args), timeout=timeout, max_connections=connections)


async def align_one(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise UsageError(f"no such audio file: {args.file}")
    try:
        transcript = sys.stdin.read() if args.text == "-" else read_transcript(Path(args.text))
    except AlignerError as error:
        raise UsageError(str(error)) from None
    to_stdout = args.output is None
    if args.json and not to_stdout:
        display: Display = JsonDisplay(1)
    elif not args.quiet and not args.json and sys.stderr.isatty():
        display = TerminalDisplay(1)
    else:
        display = Display(1, quiet=True)  # the document is stdout: failures alone, on stderr
    async with client_for(args, 2) as client:
        with display:
            try:
                aligned = await align_file(
                    client, args.file, transcript, args.language, args.format, args.mode,
                    progress=lambda info: display.job_progress(args.file.name, info), poll_s=args.poll,
                )  # fmt: skip
                if not to_stdout:
                    write_whole(args.output, aligned.document)
            except (AlignerError, OSError) as error:
                display.failed(args.file.name, why(error))
                return FAILED
            display.done(args.file.name, "stdout" if to_stdout else str(args.output), aligned.audio_seconds)
    if to_stdout:
        sys.stdout.write(aligned.document)
    return 0


async def align_folder(args: argparse.Namespace) -> int:
    if not args.audio_dir.is_dir():
        raise UsageError(f"no such folder: {args.audio_dir}")
    if not args.transcripts.is_dir():
        raise UsageError(f"no such folder: {args.transcripts}")
    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    work = pairs(args.audio_dir, args.transcripts, args.out, args.format)
    display = display_for(len(work), args.quiet, args.json)
    async with client_for(args, args.concurrency * 2) as client:
        with display:
            try:
                await run_batch(client, work, display, language=args.language, format=args.format, mode=args.mode, concurrency=args.concurrency, poll_s=args.poll)
            finally:  # interrupted too: what was done so far
                display.finish()
    return FAILED if display.summary.failed else 0


def _job_json(info) -> str:
    return json.dumps(dataclasses.asdict(info), ensure_ascii=False)


def _job_line(info) -> str:
    created = datetime.datetime.fromtimestamp(info.created_at, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    return f"{info.id}  {info.status:<9}  {info.duration:9.1f} s  {info.progress.fraction:4.0%}  {created}"


async def manage_jobs(args: argparse.Namespace) -> int:
    async with client_for(args, 2) as client:
        try:
            if args.action == "list":
                shown = 0
                async for info in client.jobs(status=args.status, page_size=min(args.limit, 100)):
                    print(_job_json(info) if args.json else _job_line(info))
                    shown += 1
                    if shown >= args.limit:
                        break
            elif args.action == "show":
                job = await client.job(args.job_id)
                print(json.dumps(dataclasses.asdict(job.info), ensure_ascii=False, indent=None if args.json else 2))
            elif args.action == "cancel":
                info = await client.cancel(args.job_id)
                print(f"{'deleted' if info is None else info.status} {args.job_id}")
            else:
                job = await client.job(args.job_id)
                document = rendered(await job.result(args.format))
                if args.output is None:
                    sys.stdout.write(document)
                else:
                    write_whole(args.output, document)
        except AlignerError as error:
            print(f"error: {why(error)}", file=sys.stderr)
            return FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = parsers()
    command = argv[0] if argv and argv[0] in ("batch", "jobs") else "single"
    args = commands[command].parse_args(argv[1:] if command != "single" else argv)  # exits 2 on a usage error
    run = {"single": align_one, "batch": align_folder, "jobs": manage_jobs}[command]
    try:
        return asyncio.run(run(args))
    except UsageError as error:
        print(f"forced-align: error: {error}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
