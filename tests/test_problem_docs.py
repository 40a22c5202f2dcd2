"""docs/errors.md lists every problem type the code can return, with its status."""

import re
from pathlib import Path

from serve_app.problems import PROBLEM_TYPES

ERRORS_DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def test_every_problem_type_is_documented_with_its_status():
    rows = dict(re.findall(r"^\| `([a-z-]+)` \| (\d{3}) \|", ERRORS_DOC.read_text(), flags=re.MULTILINE))
    assert {slug: str(problem.status) for slug, problem in PROBLEM_TYPES.items()} == rows
