"""The client as a new user installs it: alone, in a new venv, with what it pulls in, and how fast
it imports.

1. `python -m venv` in a temporary directory, then `pip install ./client` (from this checkout; its
   dependencies from the package index): the seconds it took and the distributions installed,
   checked to hold none of torch, ray, transformers (nor numpy);
2. import time, in that venv: `python -c "import aligner_client"` minus `python -c "pass"`, each
   run --runs times in a new process, interleaved; and Python's own -X importtime figure for the
   package. `forced-align --help` is timed the same way.

Target (exit 1 when missed): the import median < 0.3 s; nothing heavy installed.

    .venv/bin/python -m bench.client_package [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "ray", "transformers", "numpy"}
TARGET_IMPORT_S = 0.3


def _seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def _self_reported_import_s(python: str) -> float:
    report = subprocess.run([python, "-X", "importtime", "-c", "import aligner_client"], capture_output=True, text=True, check=True).stderr
    line = next(line for line in report.splitlines() if re.search(r"\|\s*aligner_client$", line))
    return int(line.split("|")[1]) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    arguments = parser.parse_args()
    venv = Path(tempfile.mkdtemp(prefix="bench-client-")) / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, pip = str(venv / "bin" / "python"), str(venv / "bin" / "pip")
    started = time.perf_counter()
    subprocess.run([pip, "install", "-q", str(ROOT / "client")], check=True)
    install_s = time.perf_counter() - started
    installed = {item["name"].lower() for item in json.loads(subprocess.run([pip, "list", "--format=json"], capture_output=True, text=True, check=True).stdout)}
    heavy = HEAVY & installed
    print(f"pip install ./client: {install_s:.1f} s; {len(installed)} distributions: {', '.join(sorted(installed))}")
    print(f"heavy ones installed: {sorted(heavy) or 'none'}")

    empty, imported, helped = [], [], []
    for _ in range(arguments.runs):
        empty.append(_seconds([python, "-c", "pass"]))
        imported.append(_seconds([python, "-c", "import aligner_client"]))
        helped.append(_seconds([str(venv / "bin" / "forced-align"), "--help"]))
    import_s = [full - base for full, base in zip(imported, empty)]
    reported = [_self_reported_import_s(python) for _ in range(arguments.runs)]
    median = statistics.median(import_s)
    print(
        f"import aligner_client: median {median * 1000:.0f} ms (range {min(import_s) * 1000:.0f}-{max(import_s) * 1000:.0f}) over an empty interpreter; "
        f"-X importtime median {statistics.median(reported) * 1000:.0f} ms; forced-align --help median {statistics.median(helped) * 1000:.0f} ms "
        f"({arguments.runs} runs each); target < {TARGET_IMPORT_S * 1000:.0f} ms"
    )
    return 0 if median < TARGET_IMPORT_S and not heavy else 1


if __name__ == "__main__":
    sys.exit(main())
