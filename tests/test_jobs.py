"""Asynchronous jobs through the real graph: POST /v1/jobs -> Redis stream -> JobRunner -> Aligner.

Real Redis, real Ray Serve, real clamd, PocketSphinx ("aligner" app) and the tiny Qwen3 checkpoint
("qwen3" app, whose jobs expire within seconds: tests/conftest.py). Faults are real too: the
Aligner and JobRunner replicas are killed with SIGKILL, Redis is stopped and started again.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import psutil
import numpy as np
import pytest
from ray import serve

from bench.long_audio import plan_recording, samples
from deployments.backends.base import SAMPLE_RATE
from serve_app.security.ratelimit import AUDIO_SECONDS_POLICY, TokenBucketLimiter
from serve_app.security.redis_store import request_path_client
from tests.conftest import EVAL_DIR, TEST_QWEN3_JOB_RETENTION_S, create_api_key
from tests.support.audio import encode
from tests.support.spool import spool_entries
from tests.test_api import assert_problem, post_align

pytestmark = pytest.mark.usefixtures("serve_url")

CLIP = (EVAL_DIR / "msajc003.wav").read_bytes()
CLIP_TEXT = "amongst her friends she was considered beautiful"
TERMINAL = {"succeeded", "failed", "cancelled"}


def submit(client, audio: bytes, text: str, prefix: str = "", headers: dict | None = None, **fields) -> httpx.Response:
    files = {"audio": ("clip.wav", audio, "audio/wav")}
    return client.post(f"{prefix}/v1/jobs", files=files, data={"text": text, **fields}, headers=headers or {})


def wait_for(client, job_id: str, statuses: set[str], prefix: str = "", timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get(f"{prefix}/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job still {job['status']} after {timeout_s} s"
        time.sleep(0.2)


def key_for(serve_url: str, redis_server, plan: str, owner: str = "jobs-test") -> tuple[str, httpx.Client]:
    """A new principal on `plan`, and a client that calls as it."""
    key = create_api_key(redis_server, owner, ["align"], plan)
    return key, httpx.Client(base_url=serve_url, timeout=120, headers={"Authorization": f"Bearer {key}"})


@pytest.fixture(scope="module")
def recording_5min():
    plan = plan_recording(300.0, seed=5)
    return plan.recording(), encode(samples(plan)[np.newaxis, :], SAMPLE_RATE, "flac")


@pytest.fixture(scope="module")
def recording_1min():
    plan = plan_recording(60.0, seed=6)
    return plan.recording(), encode(samples(plan)[np.newaxis, :], SAMPLE_RATE, "flac")


def _principal(key: str) -> str:
    return f"api_key:{key.split('_')[1]}"


def _audio_tokens(redis_server, key: str, capacity: float, refill_per_s: float) -> float:
    async def read() -> float:
        redis = request_path_client(redis_server.url)
        try:
            decision = await TokenBucketLimiter(redis).take(_principal(key), capacity, refill_per_s, 0.0, policy=AUDIO_SECONDS_POLICY, charge=False)
            return decision.remaining
        finally:
            await redis.aclose()

    return asyncio.run(read())


def _job_files(spool_dir) -> list[str]:
    jobs = spool_dir / "jobs"
    return spool_entries(jobs) if jobs.exists() else []


# -- the happy path ---------------------------------------------------------------------------------


def test_submit_poll_and_fetch_every_format_equal_to_the_synchronous_answer(client, spool_dir):
    response = submit(client, CLIP, CLIP_TEXT, format="srt")
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}" == job["links"]["self"]
    assert job["status"] in ("queued", "running") and job["format"] == "srt"
    assert job["duration"] == pytest.approx(2.904, abs=0.01)
    done = wait_for(client, job["id"], TERMINAL)
    assert done["status"] == "succeeded", done
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]
    assert done["expires_at"] > done["finished_at"]
    assert done["progress"]["windows_done"] == done["progress"]["windows_total"] == 1
    assert done["progress"]["audio_seconds_done"] == done["progress"]["audio_seconds_total"]
    default = client.get(done["links"]["result"])
    assert default.status_code == 200 and default.headers["content-type"].startswith("application/x-subrip")
    for output in ("json", "srt", "vtt", "textgrid"):
        fetched = client.get(done["links"]["result"], params={"format": output})
        direct = post_align(client, CLIP, CLIP_TEXT, format=output)
        assert fetched.status_code == direct.status_code == 200, fetched.text
        assert fetched.headers["content-type"] == direct.headers["content-type"]
        if output == "json":
            job_body, direct_body = fetched.json(), direct.json()
            assert job_body["id"] == job["id"]
            assert {k: v for k, v in job_body.items() if k != "id"} == {k: v for k, v in direct_body.items() if k != "id"}
        else:
            assert fetched.text == direct.text
    assert _job_files(spool_dir) == []  # the audio went as soon as the job ended


def test_a_bad_upload_is_refused_at_submission_not_as_a_failed_job(client):
    assert_problem(submit(client, b"not audio at all" * 100, CLIP_TEXT), 415, "unsupported-media-type")
    assert_problem(submit(client, CLIP, "one two three " * 200), 422, "invalid-transcript")
    listed = client.get("/v1/jobs", params={"limit": 100}).json()["jobs"]
    assert all(job["duration"] > 0 for job in listed)  # no job was created for either


def test_a_transcript_the_audio_does_not_hold_fails_the_job_with_its_problem(client, recording_5min):
    recording, flac = recording_5min
    words = recording.transcript.split()
    wrong = " ".join(reversed(words))  # the same words, in an order the speech does not have
    job = submit(client, flac, wrong).json()
    done = wait_for(client, job["id"], TERMINAL, timeout_s=180)
    assert done["status"] == "failed"
    assert done["error"]["status"] == 422 and done["error"]["type"].endswith(":transcript-audio-mismatch")
    assert "Traceback" not in json.dumps(done)
    assert_problem(client.get(done["links"]["result"]), 409, "job-result-unavailable")


# -- idempotency -----------------------------------------------------------------------------------


def test_a_retried_submission_with_its_idempotency_key_is_the_same_job_charged_once(serve_url, redis_server):
    key, session = key_for(serve_url, redis_server, "hour-of-audio")
    with session:
        headers = {"Idempotency-Key": "retry-me-7f3a"}
        first = submit(session, CLIP, CLIP_TEXT, headers=headers)
        assert first.status_code == 202, first.text
        after_first = _audio_tokens(redis_server, key, 3600, 0.001 / 3600)
        second = submit(session, CLIP, CLIP_TEXT, headers=headers)
        assert second.status_code == 202 and second.headers["idempotent-replayed"] == "true"
        assert second.json()["id"] == first.json()["id"]
        assert _audio_tokens(redis_server, key, 3600, 0.001 / 3600) == pytest.approx(after_first, abs=0.01)
        assert after_first == pytest.approx(3600 - 2.904, abs=0.05)
        assert_problem(submit(session, CLIP, CLIP_TEXT + " again", headers=headers), 422, "idempotency-key-reused")
        assert_problem(submit(session, CLIP, CLIP_TEXT, headers={"Idempotency-Key": "has space"}), 400, "invalid-request")
        assert len(session.get("/v1/jobs").json()["jobs"]) == 1
        wait_for(session, first.json()["id"], TERMINAL)


# -- object-level authorization --------------------------------------------------------------------


def test_another_principals_job_is_404_on_every_route_like_a_job_that_never_existed(serve_url, client, redis_server, admin_key, audit_log_path):
    job = submit(client, CLIP, CLIP_TEXT).json()
    wait_for(client, job["id"], TERMINAL)
    _, other = key_for(serve_url, redis_server, "unlimited", owner="someone-else")
    never = "job_" + "0" * 32
    with other:
        for job_id in (job["id"], never, "not-a-job-id"):
            for method, path in (("GET", ""), ("GET", "/result"), ("DELETE", "")):
                body = assert_problem(other.request(method, f"/v1/jobs/{job_id}{path}"), 404, "not-found")
                assert body["detail"] == "no such job"
        assert job["id"] not in [listed["id"] for listed in other.get("/v1/jobs").json()["jobs"]]
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"  # untouched
    denied = [json.loads(line) for line in audit_log_path.read_text().splitlines() if '"job"' in line and '"not-owner"' in line]
    assert sum(1 for line in denied if line.get("job_id") == job["id"]) >= 3
    owner = _principal(client.headers["authorization"].removeprefix("Bearer "))
    admin = httpx.Client(base_url=serve_url, timeout=30, headers={"Authorization": f"Bearer {admin_key}"})
    with admin:
        listed = admin.get("/v1/admin/jobs", params={"owner": owner, "limit": 100})
        assert listed.status_code == 200, listed.text
        assert job["id"] in [entry["id"] for entry in listed.json()["jobs"]]
        assert client.get("/v1/admin/jobs", params={"owner": owner}).status_code == 403


def test_list_pages_newest_first_and_filters_by_status(serve_url, redis_server):
    _, session = key_for(serve_url, redis_server, "unlimited", owner="pager")
    with session:
        ids = [submit(session, CLIP, CLIP_TEXT).json()["id"] for _ in range(5)]
        for job_id in ids:
            wait_for(session, job_id, TERMINAL)
        seen, cursor = [], None
        while True:
            page = session.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            assert len(page["jobs"]) <= 2
            seen += [job["id"] for job in page["jobs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == list(reversed(ids))
        assert [job["id"] for job in session.get("/v1/jobs", params={"status": "succeeded", "limit": 100}).json()["jobs"]] == list(reversed(ids))
        assert session.get("/v1/jobs", params={"status": "running"}).json() == {"jobs": [], "next_cursor": None}
        assert_problem(session.get("/v1/jobs", params={"status": "nonsense"}), 400, "invalid-request")
        assert_problem(session.get("/v1/jobs", params={"cursor": "abc"}), 400, "invalid-request")
        assert_problem(session.get("/v1/jobs", params={"limit": 0}), 400, "invalid-request")


# -- cancel, quotas, retention -------------------------------------------------------------------


def test_cancel_running_and_queued_jobs_deletes_their_audio_and_refunds_only_the_queued_one(serve_url, redis_server, recording_5min, spool_dir):
    recording, flac = recording_5min
    key, session = key_for(serve_url, redis_server, "hour-of-audio", owner="canceller")
    with session:
        jobs = [submit(session, flac, recording.transcript).json() for _ in range(3)]  # the runner runs 2 at once
        assert all("id" in job for job in jobs), jobs
        running = wait_for(session, jobs[0]["id"], {"running"} | TERMINAL)
        assert running["status"] == "running"
        queued = session.get(f"/v1/jobs/{jobs[2]['id']}").json()
        assert queued["status"] == "queued"
        before = _audio_tokens(redis_server, key, 3600, 0.001 / 3600)
        cancelled = session.delete(f"/v1/jobs/{jobs[2]['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert _audio_tokens(redis_server, key, 3600, 0.001 / 3600) == pytest.approx(before + recording.duration, abs=0.1)
        stopped = session.delete(f"/v1/jobs/{jobs[0]['id']}")
        assert stopped.status_code == 200 and stopped.json()["status"] == "cancelled"
        assert _audio_tokens(redis_server, key, 3600, 0.001 / 3600) == pytest.approx(before + recording.duration, abs=0.1)
        for job in (jobs[0], jobs[2]):
            assert_problem(session.get(f"/v1/jobs/{job['id']}/result"), 409, "job-result-unavailable")
        wait_for(session, jobs[1]["id"], TERMINAL, timeout_s=180)
        time.sleep(3)  # the cancelled running attempt notices at its next heartbeat
        assert session.get(f"/v1/jobs/{jobs[0]['id']}").json()["status"] == "cancelled"  # never overwritten
        assert _job_files(spool_dir) == []
        deleted = session.delete(f"/v1/jobs/{jobs[1]['id']}")
        assert deleted.status_code == 204
        assert_problem(session.get(f"/v1/jobs/{jobs[1]['id']}"), 404, "not-found")


def test_a_plan_caps_its_queued_and_running_jobs(serve_url, redis_server, recording_1min):
    recording, flac = recording_1min
    _, session = key_for(serve_url, redis_server, "two-jobs", owner="capped")
    with session:
        first = [submit(session, flac, recording.transcript) for _ in range(2)]
        assert [response.status_code for response in first] == [202, 202]
        third = submit(session, flac, recording.transcript)
        assert third.status_code == 429, third.text
        body = third.json()
        assert body["type"].endswith("#quota-exceeded") and body["violated-policies"] == ["jobs"]
        assert "retry-after" in third.headers
        for response in first:
            wait_for(session, response.json()["id"], TERMINAL)
        assert submit(session, flac, recording.transcript).status_code == 202


def test_ended_jobs_expire_after_the_retention_and_answer_404(client, audit_log_path):
    job = submit(client, CLIP, CLIP_TEXT, prefix="/qwen3").json()
    done = wait_for(client, job["id"], TERMINAL, prefix="/qwen3")
    assert done["expires_at"] == pytest.approx(done["finished_at"] + TEST_QWEN3_JOB_RETENTION_S, abs=0.01)
    time.sleep(max(done["expires_at"] - time.time(), 0) + 2.5)
    assert_problem(client.get(f"/qwen3/v1/jobs/{job['id']}"), 404, "not-found")
    assert job["id"] not in [listed["id"] for listed in client.get("/qwen3/v1/jobs").json()["jobs"]]
    expired = [json.loads(line) for line in audit_log_path.read_text().splitlines() if '"expired"' in line]
    assert any(line.get("job_id") == job["id"] for line in expired)


# -- faults ------------------------------------------------------------------------------------------


def test_a_job_survives_the_aligner_replica_being_killed_mid_job(client, recording_5min):
    recording, flac = recording_5min
    job = submit(client, flac, recording.transcript).json()
    running = wait_for(client, job["id"], {"running"} | TERMINAL)
    assert running["status"] == "running"
    time.sleep(2)
    os.kill(serve.get_deployment_handle("Aligner", app_name="aligner").pid.remote().result(), signal.SIGKILL)
    done = wait_for(client, job["id"], TERMINAL, timeout_s=240)
    assert done["status"] == "succeeded", done
    words = client.get(done["links"]["result"], params={"format": "json"}).json()["words"]
    assert [word["text"] for word in words] == recording.transcript.split()


def test_a_job_survives_its_runner_being_killed_and_is_redelivered(client, recording_5min):
    recording, flac = recording_5min
    job = submit(client, flac, recording.transcript).json()
    wait_for(client, job["id"], {"running"} | TERMINAL)
    runner = serve.get_deployment_handle("JobRunner", app_name="aligner")
    os.kill(runner.pid.remote().result(), signal.SIGKILL)
    done = wait_for(client, job["id"], TERMINAL, timeout_s=300)
    assert done["status"] == "succeeded", done
    words = client.get(done["links"]["result"], params={"format": "json"}).json()["words"]
    assert [word["text"] for word in words] == recording.transcript.split()


def test_jobs_queued_across_a_redis_restart_all_finish(client, redis_server, recording_1min):
    recording, flac = recording_1min
    ids = [submit(client, flac, recording.transcript).json()["id"] for _ in range(4)]
    redis_server.stop()
    try:
        time.sleep(3)
        assert_problem(submit(client, CLIP, CLIP_TEXT), 503, "service-unavailable")
    finally:
        redis_server.start()
    for job_id in ids:
        assert wait_for(client, job_id, TERMINAL, timeout_s=240)["status"] == "succeeded"


def test_ready_reports_the_job_queue(serve_url, client, admin_key):
    assert client.get("/v1/ready").json()["jobs"] == "ready"
    admin = httpx.Client(base_url=serve_url, timeout=30, headers={"Authorization": f"Bearer {admin_key}"})
    with admin:
        checks = admin.get("/v1/admin/dependencies").json()["checks"]
    assert checks["jobs"]["status"] == "ready" and "queued" in checks["jobs"]["detail"]


def test_a_job_survives_its_ingress_replicas_being_killed(client, recording_5min):
    recording, flac = recording_5min
    job = submit(client, flac, recording.transcript).json()
    assert wait_for(client, job["id"], {"running"} | TERMINAL)["status"] == "running"
    ingresses = [process for process in psutil.process_iter(["cmdline"]) if any("ServeReplica:aligner:Ingress" in part for part in process.info["cmdline"] or [])]
    assert ingresses
    for process in ingresses:  # every one: Serve starts new replicas; the job does not need them
        process.kill()
    deadline = time.monotonic() + 180
    while True:  # the proxy answers 503 until a new ingress replica runs
        response = client.get(f"/v1/jobs/{job['id']}")
        if response.status_code == 200 and response.json()["status"] in TERMINAL:
            break
        assert response.status_code in (200, 502, 503) and time.monotonic() < deadline, response.text
        time.sleep(0.5)
    assert response.json()["status"] == "succeeded"
    assert _ready_again(client)


def _ready_again(client, timeout_s: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/v1/ready").status_code == 200:
            return True
        time.sleep(1)
    return False
