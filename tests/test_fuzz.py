"""Schemathesis against the running ingress's own OpenAPI document.

Every generated request must get a documented status and content type and never a 5xx. Random bytes
are schema-valid uploads that are rightly refused, so "positive data is accepted" is not checked.

It runs as schemathesis's own CLI in a child process: importing qwen_asr (the qwen3 backend tests do)
loads DyNet, which switches the CPU to flush-subnormals-to-zero for the whole process, and Hypothesis
refuses to generate floats under that mode.
"""

import subprocess
import sys
from pathlib import Path

from tests.conftest import create_api_key

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def test_api_conforms_to_its_schema(serve_url, redis_server, tmp_path):
    # An admin key of its own: the fuzzer's refused uploads may rightly get its key banned.
    key = create_api_key(redis_server, "fuzzer", ["align", "admin"], "unlimited")
    result = subprocess.run(
        [
            str(SCHEMATHESIS), "run", f"{serve_url}/v1/openapi.json",
            "--checks", "all", "--exclude-checks", "positive_data_acceptance",
            "--max-examples", "150", "--seed", "20261125", "--request-timeout", "60",
            "--suppress-health-check", "all", "--generation-database", "none",
            # Not revoke and rotate: the fuzzer reuses the key ids GET /v1/admin/keys lists and would
            # revoke the keys the rest of the session authenticates with (tests/test_auth_http.py and
            # tests/test_surface.py cover both routes, their bodies and their refusals).
            "--exclude-path-regex", r"/(revoke|rotate)$",
            "--header", f"Authorization: Bearer {key}",
        ],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert "No issues found" in result.stdout or " passed" in result.stdout, report
    assert "Authentication failed" not in result.stdout, report  # the fuzzer got past the gate
