"""The probes' access lines are dropped, every other line is kept: on Serve's own log records, and in
the running graph's replica logs."""

from __future__ import annotations

import logging
import time

import pytest
from ray.serve._private.logging_utils import access_log_msg

from deployments.probe_access_log import ProbeAccessLogFilter
from tests.conftest import EVAL_DIR
from tests.support.cluster import logs_dir
from tests.test_api import post_align


def _access_record(method: str) -> logging.LogRecord:
    message = access_log_msg(method="CALL", route=method, status="OK", latency_ms=0.4)
    return logging.makeLogRecord({"name": "ray.serve", "msg": message, "serve_access_log": True})


def test_probe_calls_are_dropped_and_real_work_is_kept():
    quiet = ProbeAccessLogFilter(frozenset({"load", "ready"}))
    assert not quiet.filter(_access_record("load"))
    assert not quiet.filter(_access_record("ready"))
    assert quiet.filter(_access_record("inspect"))
    assert quiet.filter(_access_record("loaded"))  # the method name whole, not a prefix
    # Not an access line: kept, even when its text looks like one.
    assert quiet.filter(logging.makeLogRecord({"name": "ray.serve", "msg": "CALL load OK 0.4ms"}))
    http = logging.makeLogRecord({"msg": access_log_msg(method="GET", route="/load", status="200", latency_ms=1), "serve_access_log": True})
    assert quiet.filter(http)


def test_a_filter_without_methods_is_a_configuration_error():
    with pytest.raises(ValueError):
        ProbeAccessLogFilter(frozenset())


def test_the_graph_logs_no_probe_calls_but_still_logs_real_work(client, eval_utterances):
    utterance = eval_utterances[0]
    assert post_align(client, (EVAL_DIR / utterance["audio"]).read_bytes(), utterance["transcript"]).status_code == 200
    time.sleep(3)  # several shedder probes (every second) and a readiness round (every two)
    lines = {"Scanner": "", "Aligner": ""}
    for name in lines:
        for path in (logs_dir() / "serve").glob(f"replica_*_{name}_*.log"):
            lines[name] += path.read_text(errors="replace")
    for name, text in lines.items():
        assert text, f"no {name} replica log"
        assert " CALL load " not in text, name
    assert " CALL inspect OK" in lines["Scanner"] and " CALL align OK" in lines["Aligner"]
