"""What the benchmark scripts share: timing, comparing in turns, machine facts, where
results go (atomic JSON, PNG paths) and reading a training run's log."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dinoserve.shipped import OPENCLIPART_CSV  # noqa: F401  (re-exported: the scripts' default data)

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


# ======================================================================================
# timing
# ======================================================================================

def timed(call: Callable[[], object], seconds: float) -> tuple[list[float], float]:
    """Call ``call()`` back to back for ``seconds`` (at least once): each call's latency in
    seconds, and the wall time of the whole window."""
    latencies, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or not latencies:
        t = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - t0


def timed_concurrently(make_call: Callable[[], Callable[[], object]], concurrency: int,
                       seconds: float) -> tuple[list[float], float]:
    """Run ``call()`` from ``concurrency`` threads for ``seconds``; every call's latency and the
    wall time.

    ``make_call()`` is invoked once per thread (clients are per thread: tritonclient's HTTP
    client is not thread-safe), and each thread makes one untimed call to warm its
    connection; the clock starts once every thread is warm.
    """
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    start_barrier = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        call = make_call()
        call()
        start_barrier.wait()
        while time.perf_counter() < stop_at[0]:
            t = time.perf_counter()
            call()
            latencies[i].append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600  # set properly once every thread is warm
    start_barrier.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return [x for lat in latencies for x in lat], wall


def median_seconds_in_turns(calls: dict[str, Callable[[int], object]], rounds: int,
                            warmup: int = 1) -> dict[str, float]:
    """Median seconds of each call, the calls taking turns within every round, so that load
    from other processes on a shared machine slows each of them alike.

    Each call gets the round's number (warm-up rounds included, counting from 0), for
    calls that vary their input by round; the first ``warmup`` rounds are not timed.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + rounds):
        for name, call in calls.items():
            t = time.perf_counter()
            call(i)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t) for name, t in times.items()}


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    """p50, p95 and p99 of latencies given in seconds, in milliseconds."""
    ms = np.asarray(latencies_s) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ======================================================================================
# the machine and the results
# ======================================================================================

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
    from dinoserve.atomic import atomic_write_text

    return atomic_write_text(RESULTS / f"{name}.json", json.dumps(data, indent=2) + "\n")


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
