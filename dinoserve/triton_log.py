"""What tritonserver's output says: the lines that explain a failure, and which onnxruntime
provider each Python-backend runner got.

A CPU-only machine makes tritonserver print GPU-probing warnings and start-up tables on every
start; neither is ever the reason it failed, so a failure report leaves them out and shows
the error lines (or, when there are none, the last lines). The runner
(:mod:`dinoserve.triton_runner`) prints one :func:`provider_line` when its model loads, and
:func:`runner_providers` reads those lines back. No imports beyond the standard library.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

__all__ = ["PROVIDER_LOG", "failure_lines", "provider_line", "read_log", "runner_providers"]

#: Marks the runner's server-log line that names the onnxruntime provider it runs on.
PROVIDER_LOG = "dinoserve-runner:"

#: Lines a CPU-only machine always prints; never the reason a start failed.
_NOISE = re.compile(r"CudaDriverHelper|NVML|DCGM|cuda|GPU metrics|pinned memory", re.IGNORECASE)
#: Triton's start-up tables (options, backends, models): "+---+" borders and "| key | value |" rows.
_TABLE_LINE = re.compile(r"^\s*[+|]")
#: A runner's own error (dinoserve's exception names): never noise, even when it mentions CUDA.
_RUNNER_ERROR = re.compile(r"\b(ConfigError|ModelFileError|DinoserveError)\b")
_ERROR_LINE = re.compile(r"^E\d{4} |error|failed|UNAVAILABLE|Traceback|Exception", re.IGNORECASE)


def read_log(path: Path | None) -> list[str]:
    """The lines of the server's log at ``path``; none when there is no log (yet)."""
    if path is None:
        return []
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def failure_lines(lines: Iterable[str], limit: int = 12) -> list[str]:
    """The lines that explain a failure: the errors if there are any, else the last six
    meaningful lines (GPU-probing noise and start-up tables left out); at most ``limit``."""
    meaningful = [line for line in lines
                  if line.strip() and (_RUNNER_ERROR.search(line) or not _NOISE.search(line))
                  and not _TABLE_LINE.match(line)]
    errors = [line for line in meaningful if _ERROR_LINE.search(line)] or meaningful[-6:]
    return errors[-limit:]


def provider_line(model: str, version: str, device: str, provider: str) -> str:
    """The line a runner prints once its session is open (read back by :func:`runner_providers`)."""
    return f"{PROVIDER_LOG} model={model} version={version} device={device} provider={provider}"


def runner_providers(lines: Iterable[str]) -> dict[str, str]:
    """Model -> the provider its runner reported in ``lines`` (the latest load wins)."""
    found: dict[str, str] = {}
    for line in lines:
        if PROVIDER_LOG in line:
            fields = dict(f.split("=", 1) for f in line.split(PROVIDER_LOG, 1)[1].split() if "=" in f)
            if "model" in fields and "provider" in fields:
                found[fields["model"]] = fields["provider"]
    return found
