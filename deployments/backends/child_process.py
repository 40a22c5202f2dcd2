"""A backend in a child process at a lower CPU priority: the Aligner's second lane, for job windows.

Why: a backend is one decoder, not thread-safe, and PocketSphinx holds the GIL for a whole decode,
so in one process a request's job waits for the job window already running (about a second for a
PocketSphinx locating window): /v1/align p50 went to 2.4x its idle value while a long job ran. With
the windows aligned by a second backend in a child process, a request's batch runs beside a window
instead of after it, and at `nice` +10 the window gets the CPU that requests leave (Ray starts its
workers at nice 15, so the child runs at 19 there).
For CPU backends only (PocketSphinx): a second Qwen3 on the same GPU would double its memory, and a
GPU batch is short, so Qwen3 replicas keep one lane (deployments.aligner).

The child is started on the first batch (a replica that never sees a job window never starts one)
and lives as long as the replica: it dies with its parent (PR_SET_PDEATHSIG, Linux) or when the
pipe closes. Ray does not count its CPU or memory (~190 MB RSS here: a second model and its
Python) against the replica's `ray_actor_options`: where aligners run on CPU nodes, size for it.

Failure policy: a child that dies (killed, out of memory, or it could not build its backend) fails
the batch it held with a transient `BackendFailed` (503 for that window; the job runner retries
windows), logged, and a new child is started for the next batch. An exception inside the child's
`align_batch` fails that batch's jobs, as in process (deployments.aligner), and the child goes on.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection

from deployments.backends.base import AlignerBackend, AlignmentJob, BackendFailed, BackendInfo, JobOutcome

logger = logging.getLogger("ray.serve")

CHILD_NICE = 10  # added to the replica's nice value: a tenth of a contended CPU against normal work
_PR_SET_PDEATHSIG = 1


class ChildProcessBackend:
    """`align_batch` answered by the backend `build()` makes in a child process (see the module docstring)."""

    def __init__(self, build: Callable[[], AlignerBackend], info: BackendInfo) -> None:
        """`build`: picklable (it runs in the child); `info`: the backend's, as the parent's own backend has it."""
        self.info = info
        self._build = build
        self._process: multiprocessing.process.BaseProcess | None = None
        self._connection: Connection | None = None

    def align_batch(self, jobs: Sequence[AlignmentJob]) -> list[JobOutcome]:
        """Blocking, like every backend's: the calling thread waits on the pipe (the GIL is free meanwhile)."""
        try:
            connection = self._running()
            connection.send(list(jobs))
            return connection.recv()
        except (EOFError, OSError) as error:  # the child died with the batch, or could not start
            logger.error("the job-window backend process stopped (%s); starting another for the next batch", type(error).__name__)
            self.close()
            return [BackendFailed("BackendProcessDied", transient=True)] * len(jobs)

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs (tests kill it)."""
        return self._process.pid if self._process is not None and self._process.is_alive() else None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._process = self._connection = None

    def _running(self) -> Connection:
        if self._process is not None and self._process.is_alive() and self._connection is not None:
            return self._connection
        self.close()
        # spawn, never fork: the replica's process runs Ray's threads.
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        self._process = context.Process(target=_serve, args=(theirs, self._build), name="job-window-backend", daemon=True)
        self._process.start()
        theirs.close()
        self._connection = ours
        return ours


def _serve(connection: Connection, build: Callable[[], AlignerBackend]) -> None:
    """The child: build the backend, then align each batch the parent sends until the pipe closes."""
    _die_with_parent()
    os.nice(CHILD_NICE)
    backend = build()
    while True:
        try:
            jobs = connection.recv()
        except EOFError:
            return
        try:
            outcomes = backend.align_batch(jobs)
        except Exception as error:  # a backend broke its per-job contract: fail the batch's jobs, not the child
            outcomes = [BackendFailed.from_error(error)] * len(jobs)
        connection.send(outcomes)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pipe's end still stops the child, but only once it is read
        pass
