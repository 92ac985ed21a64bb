"""Per-step schedules, precomputed for the whole run and indexed by the global step."""

from __future__ import annotations

import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: float = 0, warmup_start: float = 0.0) -> np.ndarray:
    """``epochs * steps_per_epoch`` values, the reference's ``cosine_scheduler``: a linear
    warmup ``linspace(warmup_start, base, n_warm)`` (both ends included), then
    ``final + (base - final)(1 + cos(pi i / n))/2`` for ``i < n`` (so the last value is just
    above ``final``, not equal to it). A fractional ``warmup_epochs`` rounds to whole steps."""
    total = epochs * steps_per_epoch
    n_warm = min(int(round(warmup_epochs * steps_per_epoch)), total)
    warm = np.linspace(warmup_start, base, n_warm)
    n_cos = total - n_warm
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(n_cos) / max(n_cos, 1)))
    out = np.concatenate([warm, cos])
    if len(out) != total:  # pragma: no cover - guards the arithmetic above
        raise RuntimeError(f"schedule has {len(out)} values, expected {total}")
    return out
