"""Watching a run: JSON-lines log, collapse detection, progress bar text.

``log.jsonl`` gets one object per line: ``{"event": "start"|"step"|"epoch"|"knn"|"skip"|
"warning"|"end", ...}``. Only the main process writes it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("training")


class JsonlLog:
    """Append JSON lines to a file (flushed per line, so a killed run keeps its log)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self._f = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        if self._f is None:
            return
        row = {"event": event, "time": round(time.time(), 3), **fields}
        self._f.write(json.dumps(row, default=_jsonable) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


@dataclass
class CollapseMonitor:
    """Warn when DINO collapses.

    - uniform collapse: the loss sits within ``rel_tol`` of ln K (the teacher is uniform)
      for ``patience`` consecutive checks after warmup;
    - one-prototype collapse: the entropy of the batch-mean teacher distribution falls
      below ``min_mean_entropy`` nats (every image goes to the same few prototypes).
    Each kind warns once per run.
    """

    out_dim: int
    patience: int = 5
    rel_tol: float = 0.02
    min_mean_entropy: float = 0.5
    _uniform_count: int = 0
    warned: set = field(default_factory=set)

    def check(self, loss: float, mean_entropy: float) -> str | None:
        ln_k = math.log(self.out_dim)
        if abs(loss - ln_k) < self.rel_tol * ln_k:
            self._uniform_count += 1
        else:
            self._uniform_count = 0
        if self._uniform_count >= self.patience and "uniform" not in self.warned:
            self.warned.add("uniform")
            return (f"possible collapse: loss {loss:.3f} has stayed at ln K = {ln_k:.2f} for "
                    f"{self._uniform_count} log intervals (uniform teacher). Try a lower "
                    f"--teacher-temp, --warmup-teacher-temp-epochs, a smaller lr or --norm-last-layer.")
        if mean_entropy < self.min_mean_entropy and "one_prototype" not in self.warned:
            self.warned.add("one_prototype")
            return (f"possible collapse: the batch-mean teacher entropy is {mean_entropy:.3f} nats, so "
                    f"nearly every image maps to the same prototype. Try a higher --center-momentum "
                    f"effect (lower value), a higher --teacher-temp or a smaller lr.")
        return None


class Throughput:
    """Images per second over the last ``window`` seconds-ish (reset each epoch)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, n: int) -> None:
        self.images += n

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.images / dt if dt > 0 else 0.0
