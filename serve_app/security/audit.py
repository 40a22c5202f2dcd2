"""The security audit log: one JSON line per security decision, on its own logger and sink.

Each line has a timestamp, the event kind, the decision and a stable reason code, the request id,
client IP, principal id (never the credential), route, and the numbers that explain the decision
(remaining quota, declared vs decoded duration, signature name). It never holds transcripts, audio,
API keys, tokens or other secrets: callers pass only the fields below, and `record` refuses
anything that is not a number, a bool or a short string.

The sink is separate from Serve's access logs: `ALIGNER_AUDIT_LOG` names a file (appended by every
replica on the node; each line is one write) or `stdout` (default: Ray collects it per worker).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import IO

LOGGER_NAME = "forced_aligner.audit"
_MAX_FIELD_CHARS = 200


@dataclass(frozen=True)
class AuditContext:
    """Who and where, shared by every event of one request."""

    request_id: str
    client_ip: str
    route: str
    principal_id: str | None = None


class AuditLog:
    def __init__(self, stream: IO[str] | None = None, path: str | None = None) -> None:
        self._logger = logging.getLogger(LOGGER_NAME)
        self._logger.propagate = False  # never mixed into access or application logs
        self._logger.setLevel(logging.INFO)
        if not self._logger.handlers:
            handler = logging.FileHandler(path) if path else logging.StreamHandler(stream or sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            self._logger.addHandler(handler)

    @classmethod
    def from_destination(cls, destination: str) -> "AuditLog":
        return cls(path=None if destination == "stdout" else destination)

    def record(self, context: AuditContext, event: str, decision: str, reason: str, **numbers: float | int | str | bool | None) -> None:
        line: dict[str, object] = {
            "ts": round(time.time(), 3),
            "event": event,
            "decision": decision,
            "reason": reason,
            "request_id": context.request_id,
            "client_ip": context.client_ip,
            "principal": context.principal_id,
            "route": context.route,
        }
        for name, value in numbers.items():
            if isinstance(value, str):
                value = value[:_MAX_FIELD_CHARS]
            elif value is not None and not isinstance(value, (int, float, bool)):
                raise TypeError(f"audit field {name!r} must be a scalar")
            line[name] = value
        self._logger.info(json.dumps(line, separators=(",", ":"), ensure_ascii=True))
