"""What the command line shows while it works, for a person at a terminal or for a script.

- `TerminalDisplay` (stderr is a terminal): one overall bar (files, audio hours done, real-time
  rate, ETA) and one bar per running job, with a line per file above them; rich is imported here
  only, so a script that never shows a bar never pays for it;
- `PlainDisplay` (piped): one line per file on stdout, no bar;
- `JsonDisplay` (--json): one JSON object per file, and a summary object, on stdout;
- `quiet` (--quiet): failures only, on stderr.
Every display ends with the summary (done, failed with the problem title, skipped).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

from aligner_client.models import JobInfo


@dataclass
class Summary:
    done: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    skipped: list[str] = field(default_factory=list)
    audio_seconds: float = 0.0

    def line(self) -> str:
        return f"{len(self.done)} done, {len(self.failed)} failed, {len(self.skipped)} skipped ({self.audio_seconds / 3600:.2f} h of audio aligned)"

    def as_json(self) -> dict:
        return {
            "done": len(self.done), "failed": len(self.failed), "skipped": len(self.skipped),
            "audio_seconds": round(self.audio_seconds, 3),
            "failures": [{"file": name, "problem": why} for name, why in self.failed],
        }  # fmt: skip


class Display:
    """The events; the base class records the summary and shows nothing (--quiet shows failures)."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.summary = Summary()
        self.total = total
        self.quiet = quiet
        self.started_at = time.monotonic()

    def __enter__(self) -> "Display":
        return self

    def __exit__(self, *_) -> None:
        pass

    def job_progress(self, name: str, info: JobInfo) -> None:
        pass

    def done(self, name: str, output: str, audio_seconds: float | None) -> None:
        self.summary.done.append(name)
        self.summary.audio_seconds += audio_seconds or 0.0

    def failed(self, name: str, why: str) -> None:
        self.summary.failed.append((name, why))
        if self.quiet:
            print(f"failed {name}: {why}", file=sys.stderr)

    def skipped(self, name: str, reason: str) -> None:
        self.summary.skipped.append(name)

    def finish(self) -> None:
        pass


class PlainDisplay(Display):
    def done(self, name: str, output: str, audio_seconds: float | None) -> None:
        super().done(name, output, audio_seconds)
        length = f" ({audio_seconds:.1f} s of audio)" if audio_seconds is not None else ""
        print(f"done    {name} -> {output}{length}", flush=True)

    def failed(self, name: str, why: str) -> None:
        super().failed(name, why)
        print(f"failed  {name}: {why}", flush=True)

    def skipped(self, name: str, reason: str) -> None:
        super().skipped(name, reason)
        print(f"skipped {name}: {reason}", flush=True)

    def finish(self) -> None:
        print(self.summary.line(), flush=True)


class JsonDisplay(Display):
    def _emit(self, document: dict) -> None:
        print(json.dumps(document, ensure_ascii=False), flush=True)

    def done(self, name: str, output: str, audio_seconds: float | None) -> None:
        super().done(name, output, audio_seconds)
        self._emit({"file": name, "status": "done", "output": output, "audio_seconds": audio_seconds})

    def failed(self, name: str, why: str) -> None:
        super().failed(name, why)
        self._emit({"file": name, "status": "failed", "problem": why})

    def skipped(self, name: str, reason: str) -> None:
        super().skipped(name, reason)
        self._emit({"file": name, "status": "skipped", "reason": reason})

    def finish(self) -> None:
        self._emit({"summary": self.summary.as_json()})


class TerminalDisplay(Display):
    def __init__(self, total: int) -> None:
        super().__init__(total)
        from rich.console import Console
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.bars = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
        )  # fmt: skip
        self.overall = self.bars.add_task("files", total=total, rate="")
        self.jobs: dict[str, int] = {}
        self.escape = escape  # file names and problem details are shown as they are, never as markup

    def __enter__(self) -> "TerminalDisplay":
        self.bars.start()
        return self

    def __exit__(self, *_) -> None:
        self.bars.stop()

    def job_progress(self, name: str, info: JobInfo) -> None:
        total = max(info.progress.audio_seconds_total, 1e-9)
        if name not in self.jobs:
            self.jobs[name] = self.bars.add_task(f"  {self.escape(name)}", total=total, rate="")
        self.bars.update(self.jobs[name], completed=info.progress.audio_seconds_done, rate=f"{info.status}")

    def _file_ended(self, name: str) -> None:
        if name in self.jobs:
            self.bars.remove_task(self.jobs.pop(name))
        hours = self.summary.audio_seconds / 3600
        speed = self.summary.audio_seconds / max(time.monotonic() - self.started_at, 1e-9)
        self.bars.update(self.overall, advance=1, rate=f"{hours:.2f} h audio, {speed:.1f}x real time")

    def done(self, name: str, output: str, audio_seconds: float | None) -> None:
        super().done(name, output, audio_seconds)
        self.console.print(f"[green]done[/]    {self.escape(name)} -> {self.escape(output)}", highlight=False)
        self._file_ended(name)

    def failed(self, name: str, why: str) -> None:
        super().failed(name, why)
        self.console.print(f"[red]failed[/]  {self.escape(name)}: {self.escape(why)}", highlight=False)
        self._file_ended(name)

    def skipped(self, name: str, reason: str) -> None:
        super().skipped(name, reason)
        self.console.print(f"[yellow]skipped[/] {self.escape(name)}: {self.escape(reason)}", highlight=False)
        self._file_ended(name)

    def finish(self) -> None:
        self.console.print(self.summary.line(), highlight=False)


def display_for(total: int, quiet: bool, as_json: bool) -> Display:
    if as_json:
        return JsonDisplay(total)
    if quiet:
        return Display(total, quiet=True)
    if sys.stderr.isatty():
        return TerminalDisplay(total)
    return PlainDisplay(total)
