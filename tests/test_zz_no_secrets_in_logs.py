"""No secret the suite used and no transcript it sent appears in anything the service logged.

Why the name: pytest runs test modules in file-name order, so `test_zz_...` runs after every other
module has driven the session's graph, and its search covers all of their traffic. (A session-finish
hook would run later still, but could not fail the run as a test; a last test can.) Run on its own
it still means something: it sends an alignment of its own first.

Searched: every file under the Ray session's logs directory (replica logs, worker stdout/stderr,
Ray's own logs) and the audit log. Searched for: every credential registered with
tests/support/secrets_seen.py (API keys as created, and their secret part alone; access tokens),
the session's own keys, the API-key pepper, and the eval transcripts the suite aligns (whole, and
their first three words), case-insensitively.
"""

from __future__ import annotations

import time
from pathlib import Path

from serve_app.security.api_keys import parse_api_key
from tests.conftest import EVAL_DIR, PEPPER
from tests.support.cluster import logs_dir
from tests.support.secrets_seen import seen
from tests.test_api import post_align


def needles(secrets: frozenset[str]) -> dict[str, str]:
    """Each secret, plus the secret part of an API key (what a careless log of the parse would show),
    mapped to a description that names it without quoting it (the failure message is a log too)."""
    found: dict[str, str] = {}
    for number, secret in enumerate(sorted(secrets)):
        parsed = parse_api_key(secret)
        if parsed is None:
            found[secret] = f"secret #{number}"
        else:
            found[secret] = f"API key {parsed.key_id}"
            found[parsed.secret] = f"secret part of API key {parsed.key_id}"
    return found


def transcript_needles(transcripts: list[str]) -> set[str]:
    return {needle.lower() for text in transcripts for needle in (text, " ".join(text.split()[:3]))}


def logged_contents(audit_log: Path) -> dict[Path, str]:
    paths = [path for path in logs_dir().rglob("*") if path.is_file()] + [audit_log]
    return {path: path.read_bytes().decode("latin-1") for path in paths}


def contents_once_logged(request_id: str, audit_log: Path, timeout_s: float = 10) -> dict[Path, str]:
    """Every log's text, read once the replicas have logged `request_id` (they write as they answer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        contents = logged_contents(audit_log)
        if any(request_id in text for path, text in contents.items() if path.parent.name == "serve"):
            return contents
        assert time.monotonic() < deadline, f"request {request_id} never reached Serve's replica logs"
        time.sleep(0.5)


def test_no_secret_or_transcript_in_any_log(client, align_key, admin_key, audit_log_path, eval_utterances):
    utterance = eval_utterances[0]
    response = post_align(client, (EVAL_DIR / utterance["audio"]).read_bytes(), utterance["transcript"])
    assert response.status_code == 200, response.text
    # Waiting for our own request also proves the search looks where the service writes.
    contents = contents_once_logged(response.headers["x-request-id"], audit_log_path)
    assert parse_api_key(align_key).key_id in contents[audit_log_path]

    secrets = needles(seen() | {align_key, admin_key, PEPPER.decode()})
    transcripts = transcript_needles([utterance["transcript"] for utterance in eval_utterances])

    leaked_secrets = sorted(f"{path}: {name}" for path, text in contents.items() for secret, name in secrets.items() if secret in text)
    assert leaked_secrets == []
    leaked_transcripts = sorted(
        f"{path}: {needle!r}" for path, text in contents.items() for needle in transcripts if needle in text.lower()
    )
    assert leaked_transcripts == []
