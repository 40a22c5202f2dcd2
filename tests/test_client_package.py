"""The client is its own light distribution: what it depends on, what importing it loads, and that
it never reaches into the server's code (bench/client_package.py installs it alone in a new venv)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import aligner_client

CLIENT = Path(aligner_client.__file__).parent
SERVER_SIDE = {"serve_app", "deployments", "tools", "bench", "tests"}
HEAVY = {"torch", "ray", "transformers", "numpy", "fastapi", "redis", "av", "pocketsphinx", "qwen_asr"}


def test_it_depends_on_httpx_and_rich_only():
    requirements = metadata.requires("forced-aligner-client")
    assert {re.split(r"[ <>=!~;\[]", requirement, maxsplit=1)[0].lower() for requirement in requirements} == {"httpx", "rich"}


def test_importing_it_loads_nothing_heavy_not_even_rich():
    # httpx imports its own command line (click, rich, pygments) wherever click is installed, as it
    # is in the server's venv (ray needs it) but not in the client's: click is hidden here.
    script = "import sys; sys.modules['click'] = None; import aligner_client; print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))"
    loaded = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert "aligner_client" in loaded and "httpx" in loaded
    assert not (HEAVY | {"rich"} | SERVER_SIDE) & set(loaded)


def test_no_module_of_it_imports_the_server():
    for path in CLIENT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {name.split(".")[0] for name in names} & (SERVER_SIDE | HEAVY), f"{path.name} imports {names}"


def test_the_command_is_installed_and_answers_help():
    shown = subprocess.run([str(Path(sys.executable).parent / "forced-align"), "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "FORCED_ALIGNER_API_KEY" in shown.stdout
    for command in ("batch", "jobs"):
        assert subprocess.run([str(Path(sys.executable).parent / "forced-align"), command, "--help"], capture_output=True, timeout=30).returncode == 0
