"""Which steps of a pipeline are done, and for which inputs: a second run redoes only what is
missing or stale.

``<out>/<name>.json`` maps each step to the fingerprint of its inputs and what it produced;
:meth:`StepCache.done` returns that record only while the inputs are the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dinoserve.atomic import atomic_write_text


def fingerprint(*inputs: Any) -> str:
    """A short, stable hash of JSON-able ``inputs`` (paths and other objects as strings)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StepCache:
    """Finished steps in ``path`` (JSON, written atomically after each step)."""

    def __init__(self, path: str | Path, fresh: bool = False):
        self.path = Path(path)
        self.steps: dict[str, dict[str, Any]] = {}
        if self.path.is_file() and not fresh:
            self.steps = json.loads(self.path.read_text())

    def done(self, step: str, key: str) -> dict[str, Any] | None:
        """What ``step`` produced when it last ran on inputs ``key``; None if it has not."""
        entry = self.steps.get(step)
        return entry if entry and entry.get("key") == key else None

    def record(self, step: str, key: str, **outputs: Any) -> None:
        """``step`` finished on inputs ``key`` with ``outputs``."""
        self.steps[step] = {"key": key, **outputs}
        atomic_write_text(self.path, json.dumps(self.steps, indent=2))
