"""Asynchronous jobs through the real graph (PocketSphinx): a 2 h job, fairness, and a burst of 200.

Deploys configs/serve.yaml as it is (one Aligner, one JobRunner, one Scanner replica; Ingress
autoscaled 1-2) on a local Ray cluster of 4 logical CPUs over this machine's 2 cores, with a plan
that is never the limit measured. Three parts, in one run:

1. idle: p50 of POST /v1/align on the 2.9 s dev clip msajc003 (sequential, after a warm-up);
2. a 2 h recording (bench.long_audio, seed 11) submitted as a job: polled every second until it
   ends; the longest stretch of its run with no visible progress (windows done or audio seconds
   done unchanged) is reported; meanwhile the same clip is sent to POST /v1/align over and over,
   one at a time, and its p50 is compared with the idle p50;
3. 200 jobs submitted at once (200 threads; the 7 dev clips in turn): every one must succeed with
   the words (text, start, end) POST /v1/align answers for the same input. Each thread polls its
   job every 0.5 s. A call answered 503 or 429 is retried after its Retry-After, as a client must;
   how many submissions were is reported.

Targets (exit 1 when one is missed): the 2 h job succeeds; progress at least every 10 s; /v1/align
p50 while it runs <= 1.5x idle; 200 of 200 jobs succeed with the synchronous answer.

    .venv/bin/python -m bench.jobs [--long-minutes 120] [--burst 200]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.long_audio import plan_recording, write_wav
from bench.stack import BENCH_PLAN, Stack, with_bench_plan
from tests.support.cluster import application_from_yaml, start_ray, start_serve

EVAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "eval" / "emuR_ae"
TARGET_PROGRESS_GAP_S = 10.0
TARGET_P50_RATIO = 1.5
IDLE_REQUESTS = 40
TERMINAL = {"succeeded", "failed", "cancelled"}


def _clips() -> list[tuple[str, bytes, str]]:
    utterances = json.loads((EVAL_DIR / "reference.json").read_text())["utterances"]
    return [(u["id"], (EVAL_DIR / u["audio"]).read_bytes(), u["transcript"]) for u in utterances]


def _align_ms(client: httpx.Client, audio: bytes, text: str) -> float:
    started = time.perf_counter()
    response = client.post("/v1/align", files={"audio": ("clip.wav", audio, "audio/wav")}, data={"text": text})
    if response.status_code != 200:
        raise RuntimeError(f"/v1/align: {response.status_code} {response.text[:200]}")
    return (time.perf_counter() - started) * 1000


def _patient(send, expected: int, what: str, attempts: int = 50) -> tuple[httpx.Response, int]:
    """`send()` as a client must: 503 and 429 are waited out (Retry-After). The answer with the
    `expected` status and how many retries it took; any other status is an error."""
    for retries in range(attempts):
        response = send()
        if response.status_code == expected:
            return response, retries
        if response.status_code not in (429, 503):
            raise RuntimeError(f"{what}: {response.status_code} {response.text[:200]}")
        time.sleep(float(response.headers.get("retry-after", "1")))
    raise RuntimeError(f"{what}: still refused after {attempts} tries")


def _post_align(client: httpx.Client, audio: bytes, text: str) -> dict:
    files = {"audio": ("clip.wav", audio, "audio/wav")}
    return _patient(lambda: client.post("/v1/align", files=files, data={"text": text}), 200, "/v1/align")[0].json()


def _submit(client: httpx.Client, audio, text: str, filename: str = "clip.wav") -> tuple[str, int]:
    """The job id, and how many times the submission had to be retried (503/429 with Retry-After)."""

    def send() -> httpx.Response:
        if hasattr(audio, "seek"):
            audio.seek(0)
        return client.post("/v1/jobs", files={"audio": (filename, audio, "audio/wav")}, data={"text": text})

    response, retries = _patient(send, 202, "/v1/jobs", attempts=21)
    return response.json()["id"], retries


def _get(client: httpx.Client, path: str, **params) -> dict:
    return _patient(lambda: client.get(path, params=params), 200, f"GET {path}")[0].json()


def _wait(client: httpx.Client, job_id: str, poll_s: float, timeout_s: float, seen: list | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = _get(client, f"/v1/jobs/{job_id}")
        if seen is not None:
            seen.append((time.monotonic(), job["status"], job["progress"]["windows_done"], job["progress"]["audio_seconds_done"]))
        if job["status"] in TERMINAL:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']}")
        time.sleep(poll_s)


def _longest_quiet_s(seen: list) -> float:
    """The longest time, while running, between two changes of the progress the job showed."""
    running = [(at, windows, seconds) for at, status, windows, seconds in seen if status == "running"]
    if not running:
        return float("inf")
    longest, last_change, last = 0.0, running[0][0], running[0][1:]
    for at, *progress in running[1:]:
        if tuple(progress) != tuple(last):
            longest, last_change, last = max(longest, at - last_change), at, progress
    return max(longest, running[-1][0] - last_change)


def _words(body: dict) -> list[tuple[str, float, float]]:
    return [(word["text"], word["start"], word["end"]) for word in body["words"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-minutes", type=float, default=120.0)
    parser.add_argument("--burst", type=int, default=200)
    arguments = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)

    stack = Stack()
    start_ray()
    url = start_serve([application_from_yaml("aligner", "/", with_bench_plan)], request_timeout_s=3600)
    directory = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    plan = plan_recording(arguments.long_minutes * 60, seed=11)
    recording = write_wav(plan, directory / "long.wav")
    clip_id, clip, clip_text = _clips()[0]
    missed: list[str] = []
    headers = {"Authorization": f"Bearer {stack.api_key(BENCH_PLAN)}"}
    with httpx.Client(base_url=url, timeout=3700, headers=headers) as client:
        for _ in range(5):
            _align_ms(client, clip, clip_text)  # warm-up
        idle = [_align_ms(client, clip, clip_text) for _ in range(IDLE_REQUESTS)]
        idle_p50 = statistics.median(idle)
        print(f"idle: /v1/align p50 on {clip_id} {idle_p50:.1f} ms ({IDLE_REQUESTS} requests)")

        # 2: the long job, with short requests all along
        with (directory / "long.wav").open("rb") as audio:
            submitted = time.monotonic()
            job_id, _ = _submit(client, audio, recording.transcript, "long.wav")
        accepted_s = time.monotonic() - submitted
        busy: list[float] = []
        stop = threading.Event()

        def keep_asking() -> None:
            with httpx.Client(base_url=url, timeout=120, headers=headers) as own:
                while not stop.is_set():
                    busy.append(_align_ms(own, clip, clip_text))

        asker = threading.Thread(target=keep_asking, daemon=True)
        asker.start()
        seen: list = []
        job = _wait(client, job_id, 1.0, 7200, seen)
        stop.set()
        asker.join()
        run_s = job["finished_at"] - (job["started_at"] or job["finished_at"])
        quiet_s = _longest_quiet_s(seen)
        busy_p50 = statistics.median(busy) if busy else float("nan")
        print(
            f"{arguments.long_minutes:g} min job: {job['status']}; submission answered in {accepted_s:.1f} s (upload, scan, decode);"
            f" queued {(job['started_at'] or 0) - job['created_at']:.1f} s; ran {run_s:.1f} s (RTF {run_s / job['duration']:.4f});"
            f" windows {job['progress']['windows_done']}"
        )
        print(f"longest run without visible progress: {quiet_s:.1f} s (target <= {TARGET_PROGRESS_GAP_S})")
        print(
            f"/v1/align p50 while it ran: {busy_p50:.1f} ms over {len(busy)} requests = {busy_p50 / idle_p50:.3f}x idle"
            f" (target <= {TARGET_P50_RATIO}); p90 {statistics.quantiles(busy, n=10)[-1]:.1f} ms"
        )
        if job["status"] != "succeeded":
            missed.append("long job")
        if quiet_s > TARGET_PROGRESS_GAP_S:
            missed.append("progress")
        if not busy_p50 <= TARGET_P50_RATIO * idle_p50:
            missed.append("fairness")

        # 3: a burst of short jobs, each checked against the synchronous answer
        clips = _clips()
        expected = {}
        for name, audio, text in clips:
            expected[name] = _words(_post_align(client, audio, text))
        started = time.monotonic()

        def one(index: int) -> tuple[bool, int]:
            name, audio, text = clips[index % len(clips)]
            with httpx.Client(base_url=url, timeout=600, headers=headers) as own:
                job_id, retries = _submit(own, audio, text)
                done = _wait(own, job_id, 0.5, 1800)
                if done["status"] != "succeeded":
                    print(f"  {name}: {done['status']} {done['error']}")
                    return False, retries
                result = _get(own, f"/v1/jobs/{job_id}/result", format="json")
                if _words(result) != expected[name]:
                    differing = [(a, b) for a, b in zip(_words(result), expected[name]) if a != b]
                    print(f"  {name}: words differ from /v1/align's: {differing[:2]}")
                    return False, retries
                return True, retries

        with concurrent.futures.ThreadPoolExecutor(arguments.burst) as pool:
            outcomes = list(pool.map(one, range(arguments.burst)))
        burst_s = time.monotonic() - started
        good = sum(1 for ok, _ in outcomes if ok)
        retried = sum(1 for _, retries in outcomes if retries)
        print(
            f"burst: {good}/{arguments.burst} jobs succeeded with the /v1/align answer, all done in {burst_s:.1f} s;"
            f" {retried} submissions retried after 503/429 (at most {max(r for _, r in outcomes)} times)"
        )
        if good != arguments.burst:
            missed.append("burst")
    print("\nmissed: " + (", ".join(missed) if missed else "none"))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
