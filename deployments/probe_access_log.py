"""Keep Serve's access log for real work, not for the ingress's once-a-second probes.

Serve writes one access line per call a replica answers ("CALL load OK 0.4ms"). The ingress's
shedder calls Scanner.load and Aligner.load every second and its readiness task calls Scanner.ready
and Aligner.info every two seconds, which drowned the console and the Ray logs (and made the lines
that matter, with the request ids of uploads and alignments, hard to find). This filter, on Serve's
logger in those replicas, drops the access lines of the probe methods only; every other line is kept.

Failure policy: a record it cannot read as an access line is kept.
"""

from __future__ import annotations

import logging

SERVE_LOGGER = "ray.serve"


class ProbeAccessLogFilter(logging.Filter):
    def __init__(self, probe_methods: frozenset[str]) -> None:
        super().__init__()
        if not probe_methods:
            raise ValueError("name at least one probe method")
        self.probe_methods = probe_methods

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "serve_access_log", False):
            return True
        words = record.getMessage().split(" ", 2)  # "CALL <method> <status> <latency>"
        return not (len(words) >= 2 and words[0] == "CALL" and words[1] in self.probe_methods)


def quiet_probe_access_logs(*probe_methods: str) -> None:
    """Drop the access lines of these methods in this replica (call once, from its constructor)."""
    logging.getLogger(SERVE_LOGGER).addFilter(ProbeAccessLogFilter(frozenset(probe_methods)))
