"""benchmarks/peer_lightly.py without its benchmark-only dependency: one line, exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "peer_lightly.py"

# sys.modules["lightly"] = None makes `import lightly` raise ImportError, as on a machine without it
WITHOUT_LIGHTLY = ("import runpy, sys; sys.modules['lightly'] = None; sys.argv = [{script!r}] + sys.argv[1:]; "
                   "runpy.run_path({script!r}, run_name='__main__')")


def _run(*args: str) -> subprocess.CompletedProcess:
    code = WITHOUT_LIGHTLY.format(script=str(SCRIPT))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_peer_lightly_without_lightly_names_the_extra_and_exits_2():
    done = _run("--epochs", "1")
    assert done.returncode == 2
    assert 'pip install -e ".[bench]"' in done.stderr
    assert "Traceback" not in done.stderr


def test_peer_lightly_help_needs_no_lightly():
    done = _run("--help")
    assert done.returncode == 0
    assert "--limit-images" in done.stdout
