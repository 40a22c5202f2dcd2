"""RateLimit-Policy, RateLimit and Retry-After from rate-limit decisions.

Per draft-ietf-httpapi-ratelimit-headers (-11), both fields are Structured Field Lists of
String items with parameters:

    RateLimit-Policy: "requests";q=60;w=60;pk=:...:, "audio-seconds";q=1800;w=1800;aligner-unit="audio-seconds";pk=:...:
    RateLimit: "requests";r=59;t=1, "audio-seconds";r=1780;t=20

- q (quota) is the bucket capacity in force, w its window (the time an empty bucket takes to
  fill), r the whole tokens left, t the seconds until the bucket is full again.
- Audio seconds are not a registered quota unit (`qu` only takes registered values), so that
  policy carries the vendor-prefixed parameter `aligner-unit="audio-seconds"` instead.
- pk (partition key) is the first 9 bytes of SHA-256 of the bucket's key ("api_key:<key id>",
  "jwt:<client id>", "ip:<address>"): it tells a client's partitions apart without echoing ids.
- On a denial, RateLimit lists only the denied policies, each with t = its retry delay, and
  Retry-After is the largest of those: the draft wants Retry-After no earlier than the end of
  the effective windows in the same response.
- Decisions made while Redis failed have no known state: they appear in neither field (their
  Retry-After still counts when they were refused).
"""

from __future__ import annotations

import base64
import hashlib
import math
from typing import Iterable

from serve_app.security.ratelimit import AUDIO_SECONDS_POLICY, Decision

VENDOR_UNIT_PARAMETER = "aligner-unit"
_VENDOR_UNITS = {AUDIO_SECONDS_POLICY: "audio-seconds"}


def rate_limit_headers(decisions: Iterable[Decision]) -> dict[str, str]:
    """The response headers for the decisions taken on this request (empty if none are known)."""
    decisions = list(decisions)
    known = [decision for decision in decisions if not decision.store_error]
    denied = [decision for decision in decisions if not decision.allowed]
    headers: dict[str, str] = {}
    if known:
        headers["RateLimit-Policy"] = ", ".join(_policy_item(decision) for decision in known)
    if denied:
        headers["Retry-After"] = str(max(max(1, whole_seconds(decision.retry_after_s)) for decision in denied))
        limits = [_limit_item(decision, whole_seconds(decision.retry_after_s)) for decision in denied if not decision.store_error]
    else:
        limits = [_limit_item(decision, whole_seconds(decision.reset_s)) for decision in known]
    if limits:
        headers["RateLimit"] = ", ".join(limits)
    return headers


def whole_seconds(seconds: float) -> int:
    """Seconds as HTTP's integer delay-seconds, rounded up so a client never comes back early."""
    return max(0, math.ceil(seconds - 1e-9))


def partition_key(key: str) -> str:
    """The pk parameter: a Structured Field Byte Sequence derived from the bucket's key."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()[:9]
    return ":" + base64.b64encode(digest).decode("ascii") + ":"


def _policy_item(decision: Decision) -> str:
    parameters = [f"q={math.floor(decision.limit)}", f"w={max(1, whole_seconds(decision.window_s))}"]
    unit = _VENDOR_UNITS.get(decision.policy)
    if unit:
        parameters.append(f'{VENDOR_UNIT_PARAMETER}="{unit}"')
    parameters.append(f"pk={partition_key(decision.key)}")
    return _item(decision.policy, parameters)


def _limit_item(decision: Decision, effective_window_s: int) -> str:
    parameters = [f"r={max(0, math.floor(decision.remaining))}", f"t={effective_window_s}", f"pk={partition_key(decision.key)}"]
    return _item(decision.policy, parameters)


def _item(policy: str, parameters: list[str]) -> str:
    # Policy names are our own constants: plain ASCII with no quote or backslash to escape.
    return f'"{policy}";' + ";".join(parameters)
