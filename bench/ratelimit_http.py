"""Rate-limit accuracy through the real graph: 8 clients, 10 s, two ingress replicas, one bucket.

Every client uses the same API key, whose plan allows `burst` requests plus `per_minute` refill.
The requests are cheap (an empty multipart body: admitted requests answer 400 after the request
token is taken, refused ones 429), so the bucket, not the aligner, is what is measured. Admitted
requests must be within +-2 % of burst + refill x elapsed (issue 5's figure).

    .venv/bin/python -m bench.ratelimit_http [--seconds 10] [--clients 8]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import time
from collections import Counter

import httpx

from bench.stack import Stack
from tests.support.cluster import application_from_yaml, deployment_of, start_ray, start_serve

PLAN = {"requests_burst": 100, "requests_per_minute": 1200, "audio_seconds_burst": 1e6, "audio_seconds_per_hour": 1e6, "max_concurrent_requests": 1000}
TARGET_ERROR = 0.02
_EMPTY_FORM = {"content-type": "multipart/form-data; boundary=x"}


def _graph_with_two_ingress_replicas(app: dict) -> None:
    app["args"]["backend"] = "pocketsphinx"
    ingress = deployment_of(app, "Ingress")
    ingress["autoscaling_config"].update(min_replicas=2, max_replicas=2)
    ingress["user_config"]["plans"] = {"standard": {}, "measured": PLAN}
    ingress["user_config"]["rate_limits"] = {"pre_auth_burst": 10**7, "pre_auth_per_minute": 10**7}
    # Thousands of 429s would rightly get the key banned: that is measured elsewhere.
    ingress["user_config"]["abuse"] = {"max_rate_limit_hits": 10**6}


def _client_loop(url: str, key: str, deadline: float) -> Counter:
    statuses: Counter = Counter()
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}", **_EMPTY_FORM}) as client:
        while time.monotonic() < deadline:
            statuses[client.post("/v1/align", content=b"--x--\r\n").status_code] += 1
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    arguments = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)

    stack = Stack()
    start_ray()
    url = start_serve([application_from_yaml("aligner", "/", _graph_with_two_ingress_replicas)])
    key = stack.api_key("measured")

    started = time.monotonic()
    deadline = started + arguments.seconds
    with concurrent.futures.ThreadPoolExecutor(max_workers=arguments.clients) as pool:
        totals = sum(pool.map(lambda _: _client_loop(url, key, deadline), range(arguments.clients)), Counter())
    elapsed = time.monotonic() - started

    admitted = sum(count for status, count in totals.items() if status != 429)
    # The bucket starts full; requests in flight at the deadline finish after it: count to `elapsed`.
    allowed = PLAN["requests_burst"] + PLAN["requests_per_minute"] / 60 * elapsed
    error = (admitted - allowed) / allowed
    print(f"{arguments.clients} clients x {elapsed:.2f} s against 2 ingress replicas: statuses {dict(totals)}")
    print(f"admitted {admitted}, the bucket allows {allowed:.1f}: error {error * 100:+.2f} %")
    print(f"target within +-{TARGET_ERROR * 100:.0f} %: {'PASS' if abs(error) <= TARGET_ERROR else 'FAIL'}")


if __name__ == "__main__":
    main()
