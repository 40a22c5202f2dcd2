"""The whole local stack for benchmarks: Redis, clamd, Ray and Serve, plus API keys.

Benchmarks run the same services as the tests (tools.local_services, tests.support.cluster), in a
temporary directory, and stop them when the process exits.
"""

from __future__ import annotations

import atexit
import secrets
import tempfile
from pathlib import Path

from tests.support.cluster import point_replicas_at
from tests.support.keys import create_api_key
from tools.local_services import ClamdServer, RedisServer


class Stack:
    def __init__(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="bench-stack-"))
        self.redis = RedisServer(directory / "redis").start()
        self.clamd = ClamdServer(directory / "clamd").start()
        atexit.register(self.clamd.stop)
        atexit.register(self.redis.stop)
        self.pepper = secrets.token_bytes(24).hex().encode()
        point_replicas_at(self.redis.url, self.clamd.socket_path, self.pepper.decode(), directory / "audit.jsonl", directory / "spool")

    def api_key(self, plan: str, scopes: tuple[str, ...] = ("align",)) -> str:
        return create_api_key(self.redis.url, self.pepper, "bench", scopes, plan)


BENCH_PLAN = "bench"


def with_bench_plan(app: dict) -> dict:
    """Edit an application from configs/serve.yaml so a benchmark's key is never the limit measured."""
    from tests.support.cluster import deployment_of

    user_config = deployment_of(app, "Ingress")["user_config"]
    huge = {"requests_burst": 10**7, "requests_per_minute": 10**7, "audio_seconds_burst": 1e9, "audio_seconds_per_hour": 1e9, "priority": 10, "max_concurrent_requests": 10**6, "max_active_jobs": 10**6}
    user_config["plans"] = {"standard": {}, BENCH_PLAN: huge}
    user_config["rate_limits"] = {"pre_auth_burst": 10**7, "pre_auth_per_minute": 10**7}
    return app
