"""Shared helpers of the benchmark scripts: where results go, machine facts, atomic JSON."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
OPENCLIPART_CSV = REPO / "data" / "openclipart_knn.csv"


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was."""
    import torch

    from dinoserve.cpu import cpu_name

    cpu = cpu_name()
    return {
        "cpu": cpu,
        "cpu_features": cpu_features(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg_1_5_15": list(os.getloadavg()),
        "git": _git_sha(),
        "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def cpu_features() -> list[str]:
    """The CPU's instruction-set features that matter for speed (:func:`dinoserve.cpu.cpu_features`)."""
    from dinoserve.cpu import cpu_features as features

    return features()


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Write ``results/<name>.json`` atomically; return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"{name}.json"
    fd, tmp = tempfile.mkstemp(dir=RESULTS, prefix=f".{name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; results are for everyone to read
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def scrape_metrics(metrics_url: str, model: str) -> dict[str, float]:
    """Triton's ``nv_inference_*`` counters of ``model`` from its Prometheus endpoint."""
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("nv_inference_") and f'model="{model}"' in line:
            out[line.split("{", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def plot_path(name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}.png"


def read_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a training run's ``log.jsonl`` (none when it is not there yet); a last
    line still being written is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def train_seconds(rows: list[dict[str, Any]]) -> float:
    """Wall-clock seconds a run trained: from each invocation's ``start`` row to its last
    row, summed over the invocations that resumes appended to one log."""
    total, start, last = 0.0, None, None
    for r in rows:
        if r.get("event") == "start":
            if start is not None and last is not None:
                total += last - start
            start = r["time"]
        last = r.get("time", last)
    if start is not None and last is not None:
        total += last - start
    return total
