"""Per-step schedules, precomputed for the whole run and indexed by the global step."""

from __future__ import annotations

import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: float = 0, warmup_start: float = 0.0) -> np.ndarray:
    """``epochs * steps_per_epoch`` values: linear warmup from ``warmup_start`` to ``base``
    over ``warmup_epochs``, then a half cosine from ``base`` to ``final`` (inclusive)."""
    total = epochs * steps_per_epoch
    n_warm = min(int(round(warmup_epochs * steps_per_epoch)), total)
    warm = np.linspace(warmup_start, base, n_warm, endpoint=False) if n_warm else np.zeros(0)
    n_cos = total - n_warm
    if n_cos == 1:
        cos = np.array([base])
    else:
        t = np.arange(n_cos) / max(n_cos - 1, 1)
        cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t))
    out = np.concatenate([warm, cos])
    if len(out) != total:  # pragma: no cover - guards the arithmetic above
        raise RuntimeError(f"schedule has {len(out)} values, expected {total}")
    return out
