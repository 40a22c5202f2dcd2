"""Cost per request of deriving limit and ban subjects: the client-IP walk over every
X-Forwarded-For line, the IPv6 /64 block, and the issuer-qualified principal key.

    .venv/bin/python -m bench.abuse_keys [--iterations 20000] [--repeats 5]

Pure CPU, no services: each case is timed `repeats` times over `iterations` calls, and the
median and range of the per-call time (microseconds) are printed, with the load average, since on
a shared box the load dominates these figures. No target: they are there to show that these
derivations cost no more than the one-line walk the ingress already did, and little beside
the same request's several Redis round trips.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

from serve_app.security.client_ip import address_block, client_ip
from serve_app.security.principal import Principal
from serve_app.security.ratelimit import principal_key

PROXIES = ["10.0.0.0/8", "2001:db8:ffff::/48"]
API_KEY = Principal(method="api_key", id="k_0123456789ab", scopes=frozenset({"align"}), plan="standard")
JWT = Principal(method="jwt", id="batch-worker", scopes=frozenset({"align"}), plan="standard", issuer="https://auth.example.com/")

CASES: dict[str, Callable[[], object]] = {
    "client_ip, 1 line, 3 hops": lambda: client_ip("10.0.0.5", ["198.51.100.1, 10.1.1.1, 10.2.2.2"], PROXIES),
    "client_ip, 2 lines, 3 hops": lambda: client_ip("10.0.0.5", ["6.6.6.6, 198.51.100.1", "10.2.2.2"], PROXIES),
    "address_block, IPv4": lambda: address_block("198.51.100.1"),
    "address_block, IPv6 /64": lambda: address_block("2001:db8:1:2::7"),
    "principal_key, API key": lambda: principal_key(API_KEY),
    "principal_key, JWT (issuer hash)": lambda: principal_key(JWT),
}


def per_call_us(case: Callable[[], object], iterations: int) -> float:
    started = time.perf_counter()
    for _ in range(iterations):
        case()
    return (time.perf_counter() - started) / iterations * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    arguments = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name, case in CASES.items():
        case()  # warm the network-parsing cache
        samples = [per_call_us(case, arguments.iterations) for _ in range(arguments.repeats)]
        print(f"{name:36s} median {statistics.median(samples):6.2f} us  range {min(samples):.2f}-{max(samples):.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
