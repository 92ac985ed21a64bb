"""python -m benchmarks.peer_lightly without its benchmark-only dependency: one line, exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# sys.modules["lightly"] = None makes `import lightly` raise ImportError, as on a machine without it
WITHOUT_LIGHTLY = ("import runpy, sys; sys.modules['lightly'] = None; "
                   "runpy.run_module('benchmarks.peer_lightly', run_name='__main__', alter_sys=True)")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_LIGHTLY, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_peer_lightly_without_lightly_names_the_extra_and_exits_2():
    done = _run("--epochs", "1")
    assert done.returncode == 2
    assert 'pip install -e ".[bench]"' in done.stderr
    assert "Traceback" not in done.stderr


def test_peer_lightly_help_needs_no_lightly():
    done = _run("--help")
    assert done.returncode == 0
    assert "--limit-images" in done.stdout
