"""Job windows' own lane (deployments.backends.child_process): a backend in a child process.

Real child processes (spawn) and, where it matters, real PocketSphinx: the child answers what the
backend answers in process, runs at a lower CPU priority, survives a backend exception, and a child
killed mid-batch fails only that batch (transient) and is replaced. Through the Aligner: a request
does not wait for the job window running beside it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import numpy as np
import pytest

from bench.eval_set import load_eval_set
from deployments.aligner import Aligner, window_lane
from deployments.backends.base import SAMPLE_RATE, AlignmentJob, BackendFailed, BackendInfo, UnitTiming
from deployments.backends.child_process import CHILD_NICE, ChildProcessBackend
from deployments.backends.pocketsphinx import PocketSphinxBackend
from serve_app.settings import AlignerOptions, GraphArgs

INFO = BackendInfo("test", "test", frozenset({"English"}), 60.0)
SLOW_S = 3.0


class ProcessReporter:
    """Answers each job with one unit: the process id as text, its nice value as start."""

    info = INFO

    def align_batch(self, jobs):
        if jobs[0].units == ("raise",):
            raise RuntimeError("a bug")
        if jobs[0].units == ("slow",):
            time.sleep(SLOW_S)
        return [[UnitTiming(str(os.getpid()), float(os.getpriority(os.PRIO_PROCESS, 0)), 0.0, 1.0)] for _ in jobs]


def _job(*units: str) -> AlignmentJob:
    return AlignmentJob(np.zeros(SAMPLE_RATE, dtype=np.float32), units, "English")


def _clip_job() -> AlignmentJob:
    """The first dev-set utterance (../shared/eval/emuR_ae), with its transcript."""
    return load_eval_set()[0].job()


@pytest.fixture
def child():
    backend = ChildProcessBackend(ProcessReporter, INFO)
    yield backend
    backend.close()


def test_the_child_answers_as_the_backend_does_in_process():
    job = _clip_job()
    child = ChildProcessBackend(PocketSphinxBackend, PocketSphinxBackend().info)
    try:
        assert child.align_batch([job, job]) == PocketSphinxBackend().align_batch([job, job])
    finally:
        child.close()


def test_the_child_runs_in_its_own_process_at_a_lower_cpu_priority(child):
    ((unit,),) = child.align_batch([_job("a")])
    assert int(unit.text) == child.pid != os.getpid()
    assert unit.start == min(19, os.getpriority(os.PRIO_PROCESS, 0) + CHILD_NICE)


def test_a_backend_exception_fails_the_batch_and_the_child_goes_on(child):
    pid = child.align_batch([_job("a")])[0][0].text
    assert child.align_batch([_job("raise"), _job("b")]) == [BackendFailed("RuntimeError", transient=False)] * 2
    assert child.align_batch([_job("a")])[0][0].text == pid


def test_a_child_killed_mid_batch_fails_that_batch_only_and_is_replaced(child):
    first = child.align_batch([_job("a")])[0][0].text
    threading.Timer(0.5, os.kill, (int(first), signal.SIGKILL)).start()
    assert child.align_batch([_job("slow"), _job("b")]) == [BackendFailed("BackendProcessDied", transient=True)] * 2
    second = child.align_batch([_job("a")])[0][0].text
    assert second != first and child.pid == int(second)


def test_only_a_cpu_backend_gets_a_second_lane():
    pocketsphinx = PocketSphinxBackend()
    assert isinstance(window_lane(GraphArgs(backend="pocketsphinx"), pocketsphinx), ChildProcessBackend)
    assert window_lane(GraphArgs(backend="pocketsphinx", windows_in_child_process=False), pocketsphinx) is None

    class Qwen3Like:
        info = BackendInfo("qwen3", "tiny", frozenset({"English"}), 180.0)

    assert window_lane(GraphArgs(backend="qwen3"), Qwen3Like()) is None


@pytest.mark.asyncio
async def test_a_request_does_not_wait_for_the_job_window_running_beside_it(child):
    aligner = Aligner.func_or_class(GraphArgs(backend="pocketsphinx"), backend=PocketSphinxBackend(), window_backend=child)
    aligner.reconfigure(AlignerOptions().model_dump())
    child.align_batch([_job("a")])  # started: its spawn is not what is timed
    window = asyncio.create_task(aligner.align(_job("slow"), background=True))
    await asyncio.sleep(0.5)  # the window is in the child's backend
    started = time.monotonic()
    answer = await aligner.align(_clip_job())
    assert time.monotonic() - started < SLOW_S / 2 and not window.done()
    assert [unit.text for unit in answer] == list(_clip_job().units)
    assert isinstance((await window)[0], UnitTiming)
