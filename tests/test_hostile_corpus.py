"""The hostile corpus (tests.support.hostile) through the scanner's checks, in the scanner's order.

Each upload goes through libmagic sniffing, a real clamd scan and bounded decoding with the default
ScannerOptions caps, directly (no Serve), so every expectation the HTTP-level test reuses is
checked here against the real libraries. Peak memory and latency are in bench/scanner_decode.py.
"""

from __future__ import annotations

from typing import get_args

import pytest

from serve_app.media import Spool
from serve_app.problems import PROBLEM_TYPES
from serve_app.media.clamav import ClamdScanner
from serve_app.media.errors import RejectionReason
from serve_app.media.inspect import decode_limits
from serve_app.settings import IngressOptions, ScannerOptions
from tests.support.hostile import (
    ACCEPTED_STATUS,
    HOSTILE_CASES,
    MALWARE_DETECTED,
    HostileCase,
    scanner_outcome,
)
from tests.support.spool import spool_entries


@pytest.fixture(scope="module")
def clamd(clamd_server) -> ClamdScanner:
    return ClamdScanner(f"unix://{clamd_server.socket_path}", timeout_s=10)


@pytest.mark.parametrize("case", HOSTILE_CASES, ids=lambda case: case.name)
def test_case_gets_its_expected_outcome(case: HostileCase, clamd: ClamdScanner, tmp_path):
    spool = Spool(tmp_path / "spool")
    assert scanner_outcome(case.build(), clamd, decode_limits(ScannerOptions(), IngressOptions().max_audio_seconds), spool) == case.expected_slug
    assert spool_entries(tmp_path / "spool") == []


@pytest.mark.parametrize("case", HOSTILE_CASES, ids=lambda case: case.name)
def test_expected_status_matches_the_problem_catalogue(case: HostileCase):
    if case.accepted:
        assert case.expected_status == ACCEPTED_STATUS
    else:
        assert case.expected_slug in PROBLEM_TYPES, f"{case.expected_slug} is not a problem type"
        assert PROBLEM_TYPES[case.expected_slug].status == case.expected_status


def test_corpus_covers_every_media_refusal_and_acceptance():
    slugs = {case.expected_slug for case in HOSTILE_CASES}
    # decode-timeout needs a slow machine or a tiny limit: tests/test_media.py covers it.
    every_refusal = set(get_args(RejectionReason)) - {"decode-timeout"}
    assert slugs >= every_refusal | {None, MALWARE_DETECTED}
