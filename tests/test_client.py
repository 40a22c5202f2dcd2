"""The Python client (client/aligner_client) against the real graph: the session's Ray Serve
applications, Redis and clamd. Sync and asyncio flavours, jobs with progress, typed problems,
retries after 429 and 503 (clamd really stopped). The pure parts: tests/test_client_parts.py.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from aligner_client import (
    NO_RETRIES,
    Alignment,
    AsyncClient,
    AuthenticationFailed,
    Client,
    ConnectionFailed,
    InvalidInput,
    JobFailed,
    NotFound,
    RateLimited,
    RetryPolicy,
)
from bench.long_audio import plan_recording, samples
from deployments.backends.base import SAMPLE_RATE
from tests.conftest import EVAL_DIR, create_api_key
from tests.support.audio import encode

pytestmark = pytest.mark.usefixtures("serve_url")

CLIP = EVAL_DIR / "msajc003.wav"
CLIP_TEXT = "amongst her friends she was considered beautiful"
FAST = RetryPolicy(attempts=6, max_retry_after_s=3.0, backoff_s=0.2, max_backoff_s=1.0)


class CountingTransport(httpx.HTTPTransport):
    """httpx's own transport, noting the status of every answer (to see retries happen)."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.statuses.append(response.status_code)
        return response


@pytest.fixture(scope="module")
def minute_flac(tmp_path_factory):
    plan = plan_recording(60.0, seed=6)
    path = tmp_path_factory.mktemp("client") / "minute.flac"
    path.write_bytes(encode(samples(plan)[np.newaxis, :], SAMPLE_RATE, "flac"))
    return path, plan.recording().transcript


def test_align_a_clip_returns_typed_words(serve_url, align_key):
    with Client(serve_url, api_key=align_key) as client:
        alignment = client.align(CLIP, CLIP_TEXT)
        subtitles = client.align(CLIP.read_bytes(), CLIP_TEXT, format="srt")
    assert isinstance(alignment, Alignment) and alignment.backend == "pocketsphinx"
    assert [word.text for word in alignment.words] == CLIP_TEXT.split()
    assert all(0 <= word.start <= word.end <= alignment.duration for word in alignment.words)
    assert subtitles.startswith("1\n") and "-->" in subtitles


def test_a_long_file_through_a_job_reports_progress_then_its_result(serve_url, align_key, minute_flac):
    path, transcript = minute_flac
    seen = []
    with Client(serve_url, api_key=align_key) as client:
        job = client.submit(path, transcript, format="vtt")
        info = job.wait(progress=seen.append, poll_s=0.2, timeout_s=180)
        vtt = job.result()
        alignment = job.result("json")
    assert info.status == "succeeded" and not job.replayed
    statuses = [state.status for state in seen]
    assert statuses[-1] == "succeeded" and len(seen) >= 2  # at least queued/running, then the end
    done = [state.progress.audio_seconds_done for state in seen]
    assert done == sorted(done) and seen[-1].progress.fraction == pytest.approx(1.0)
    assert vtt.startswith("WEBVTT")
    assert [word.text for word in alignment.words] == transcript.split()


def test_the_asyncio_client_does_the_same(serve_url, align_key, minute_flac):
    path, transcript = minute_flac

    async def scenario():
        async with AsyncClient(serve_url, api_key=align_key) as client:
            clips = await asyncio.gather(*(client.align(CLIP, CLIP_TEXT) for _ in range(3)))
            job = await client.submit(path, transcript)
            await job.wait(poll_s=0.2, timeout_s=180)
            listed = [info.id async for info in client.jobs(page_size=2)]
            return clips, await job.result(), job.id, listed

    clips, alignment, job_id, listed = asyncio.run(scenario())
    assert all([word.text for word in clip.words] == CLIP_TEXT.split() for clip in clips)
    assert len(alignment.words) == len(transcript.split())
    assert job_id in listed  # newest first, across pages of two


def test_a_retried_submission_never_makes_a_second_job(serve_url, redis_server, minute_flac):
    path, transcript = minute_flac
    key = create_api_key(redis_server, "client-idempotency", ["align"], "unlimited")
    with Client(serve_url, api_key=key) as client:
        first = client.submit(path, transcript, idempotency_key="client-test-1")
        again = client.submit(path, transcript, idempotency_key="client-test-1")  # what a retry after a lost answer sends
        jobs = list(client.jobs())
        first.wait(poll_s=0.2, timeout_s=180)
    assert again.id == first.id and again.replayed and not first.replayed
    assert [info.id for info in jobs] == [first.id]


def test_a_cancelled_job_ends_the_wait_with_job_failed(serve_url, align_key, minute_flac):
    path, transcript = minute_flac
    with Client(serve_url, api_key=align_key) as client:
        job = client.submit(path, transcript)
        assert job.cancel().status == "cancelled"
        with pytest.raises(JobFailed) as ended:
            job.wait(poll_s=0.2, timeout_s=30)
        assert client.cancel(job.id) is None  # an ended job: deleted
        with pytest.raises(NotFound):
            job.refresh()
    assert ended.value.job.status == "cancelled" and ended.value.problem is None


def test_problems_are_typed_exceptions_and_input_errors_are_not_retried(serve_url, align_key):
    transport = CountingTransport()
    with Client(serve_url, api_key=align_key, transport=transport, retry=FAST) as client:
        with pytest.raises(InvalidInput) as refused:
            client.align(b"this is not audio at all" * 100, "hello")
        with pytest.raises(NotFound) as missing:
            client.job("job_" + "0" * 32)
    assert refused.value.status == 415 and refused.value.slug == "unsupported-media-type" and refused.value.detail
    assert missing.value.status == 404
    assert transport.statuses.count(415) == 1  # never sent twice
    with Client(serve_url, api_key="fa_forged_0000000000000000000000000000") as client:
        with pytest.raises(AuthenticationFailed) as unauthenticated:
            client.align(CLIP, CLIP_TEXT)
    assert unauthenticated.value.status == 401 and "fa_forged" not in str(unauthenticated.value)


def test_429_waits_for_retry_after_then_succeeds(serve_url, redis_server):
    key = create_api_key(redis_server, "client-rate", ["align"], "one-request-per-6s")
    transport = CountingTransport()
    with Client(serve_url, api_key=key, transport=transport, retry=FAST) as client:
        client.align(CLIP, CLIP_TEXT)
        started = time.monotonic()
        second = client.align(CLIP, CLIP_TEXT)  # the bucket is empty: 429, Retry-After, then 200
        waited = time.monotonic() - started
    assert [word.text for word in second.words] == CLIP_TEXT.split()
    assert 429 in transport.statuses and transport.statuses[-1] == 200
    assert waited >= 1.0  # it waited (Retry-After, up to 6 s here, capped at 3 s a try), it did not hammer
    assert transport.statuses.count(429) <= 3
    with Client(serve_url, api_key=key, retry=NO_RETRIES) as client:
        with pytest.raises(RateLimited) as limited:
            client.align(CLIP, CLIP_TEXT)
            client.align(CLIP, CLIP_TEXT)
    assert limited.value.status == 429 and limited.value.retry_after_s >= 1


def test_503_from_a_stopped_clamd_is_retried_until_clamd_is_back(serve_url, align_key, clamd_server):
    transport = CountingTransport()
    patient = RetryPolicy(attempts=20, max_retry_after_s=1.0, backoff_s=0.2)
    clamd_server.stop()
    restart = threading.Timer(4.0, clamd_server.start)
    restart.start()
    try:
        with Client(serve_url, api_key=align_key, transport=transport, retry=patient) as client:
            alignment = client.align(CLIP, CLIP_TEXT)
    finally:
        restart.join()
        if not clamd_server.answers():
            clamd_server.start()
    assert 503 in transport.statuses and transport.statuses[-1] == 200
    assert [word.text for word in alignment.words] == CLIP_TEXT.split()


def test_a_service_that_is_not_there_fails_after_its_attempts(tmp_path):
    with Client("http://127.0.0.1:9", api_key="fa_any", retry=RetryPolicy(attempts=3, backoff_s=0.05)) as client:
        started = time.monotonic()
        with pytest.raises(ConnectionFailed) as failed:
            client.align(CLIP, CLIP_TEXT)
    assert "3 attempts" in str(failed.value) and isinstance(failed.value.__cause__, httpx.TransportError)
    assert time.monotonic() - started < 5
