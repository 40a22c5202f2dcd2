"""One principal holding 50 slow uploads: what happens to another principal's /v1/align latency.

Deploys configs/serve.yaml (PocketSphinx backend) on a local Ray cluster, with two API keys on the
same plan (buckets too large to matter, so only the concurrency rules are measured). Per round:
- idle:  p50 of `--requests` sequential POST /v1/align from the victim's key;
- held:  the same, while the hog's key keeps 50 uploads open at once, each sending its headers and
         the start of its body and then one byte a second; each one answered is replaced by a new
         one after the answer's Retry-After (1 s without one).
Prints both p50s, their ratio (target <= 1.2x) and how the hog's uploads were answered (429 from
the per-principal concurrency cap, 408 from the upload pace).

    .venv/bin/python -m bench.slow_uploads [--rounds 3] [--requests 30] [--cap 4]
"""

from __future__ import annotations

import argparse
import collections
import logging
import re
import select
import socket
import statistics
import threading
import time
from urllib.parse import urlsplit

import httpx

from bench.service import CLIP, TRANSCRIPT
from bench.stack import BENCH_PLAN, Stack, with_bench_plan
from serve_app.settings import Plan
from tests.support.cluster import application_from_yaml, deployment_of, start_ray, start_serve

SLOW_UPLOADS = 50
TARGET_RATIO = 1.2


def victim_p50(url: str, key: str, audio: bytes, requests: int) -> tuple[float, int]:
    """p50 latency of the victim's requests, and how many were not answered 200."""
    latencies, failed = [], 0
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
        for _ in range(requests):
            started = time.perf_counter()
            response = client.post("/v1/align", files={"audio": ("clip.wav", audio)}, data={"text": TRANSCRIPT})
            latencies.append(time.perf_counter() - started)
            failed += response.status_code != 200
    return statistics.median(latencies), failed


class Hog:
    """Keeps SLOW_UPLOADS trickling uploads open from one key until stopped; counts the answers."""

    def __init__(self, url: str, key: str):
        address = urlsplit(url)
        self._address = (address.hostname, address.port)
        self._key = key
        self._stop = threading.Event()
        self.answers: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._keep_one_open, daemon=True) for _ in range(SLOW_UPLOADS)]

    def __enter__(self) -> "Hog":
        for thread in self._threads:
            thread.start()
        time.sleep(2)  # let them all reach the ingress
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _keep_one_open(self) -> None:
        head = (
            "POST /v1/align HTTP/1.1\r\nHost: bench\r\n"
            f"Authorization: Bearer {self._key}\r\n"
            "Content-Type: multipart/form-data; boundary=slowboundary\r\nContent-Length: 1000000\r\n\r\n"
        ).encode()
        body = b'--slowboundary\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n\r\n' + b"\0" * 30
        while not self._stop.is_set():
            with socket.create_connection(self._address) as connection:
                connection.sendall(head + body)
                status, retry_after_s = self._trickle(connection)
            with self._lock:
                self.answers[status] += 1
            # A 429 says when to come back; retrying sooner would measure a request flood (the
            # request buckets' job), not slots held by slow uploads.
            self._stop.wait(retry_after_s)

    def _trickle(self, connection: socket.socket) -> tuple[str, float]:
        """Send a byte a second until answered: the status and the Retry-After (1 s without one)."""
        while not self._stop.is_set():
            readable, _, _ = select.select([connection], [], [], 1.0)
            if readable:
                answer = connection.recv(4096)
                if not answer.startswith(b"HTTP/"):
                    return "closed", 1.0
                retry_after = re.search(rb"(?im)^retry-after:\s*(\d+)", answer)
                return answer.split(b" ")[1].decode(), float(retry_after.group(1)) if retry_after else 1.0
            try:
                connection.sendall(b"\0")
            except OSError:
                return "closed", 1.0
        return "still open at the end", 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=30, help="victim requests per measurement")
    parser.add_argument(
        "--cap", type=int, default=Plan().max_concurrent_requests, help="the plan's max_concurrent_requests (50+: as if there were none)"
    )
    arguments = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)

    stack = Stack()
    hog_key, victim_key = stack.api_key(BENCH_PLAN), stack.api_key(BENCH_PLAN)
    start_ray()
    def pocketsphinx_with_cap(app: dict) -> None:
        with_bench_plan(app)["args"].update(backend="pocketsphinx")
        deployment_of(app, "Ingress")["user_config"]["plans"][BENCH_PLAN]["max_concurrent_requests"] = arguments.cap

    url = start_serve([application_from_yaml("aligner", "/", pocketsphinx_with_cap)])
    audio = CLIP.read_bytes()
    victim_p50(url, victim_key, audio, 5)  # warm-up

    print(f"{SLOW_UPLOADS} slow uploads from one key (max_concurrent_requests {arguments.cap}); victim: {arguments.requests} sequential requests per measurement\n")
    print(f"{'round':>5} {'idle p50':>9} {'held p50':>9} {'ratio':>6} {'victim non-200':>14}  hog answers")
    ratios, victim_failures = [], 0
    for round_number in range(1, arguments.rounds + 1):
        idle, idle_failed = victim_p50(url, victim_key, audio, arguments.requests)
        with Hog(url, hog_key) as hog:
            held, held_failed = victim_p50(url, victim_key, audio, arguments.requests)
        ratios.append(held / idle)
        victim_failures += held_failed
        answers = ", ".join(f"{status}: {count}" for status, count in sorted(hog.answers.items()))
        print(
            f"{round_number:>5} {idle * 1000:>7.1f}ms {held * 1000:>7.1f}ms {held / idle:>5.2f}x "
            f"{idle_failed:>6} / {held_failed:<6}  {answers}"
        )
    median = statistics.median(ratios)
    # A refused request is fast: the ratio only means something when every victim request succeeded.
    verdict = "PASS" if median <= TARGET_RATIO and victim_failures == 0 else "FAIL"
    print(
        f"\nratio median {median:.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x, victim non-200 while held: "
        f"{victim_failures} (target <= {TARGET_RATIO}x and none refused: {verdict})"
    )


if __name__ == "__main__":
    main()
