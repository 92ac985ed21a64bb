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


def _epoch(split_hits: str, loo_hits: str, with_hits: bool) -> dict:
    row = {"epoch": 1}
    for p, h in (("split", split_hits), ("loo", loo_hits)):
        top1 = 100.0 * h.count("1") / len(h)
        row |= {f"{p}_top1": top1, f"{p}_se": 100.0 * (top1 / 100 * (1 - top1 / 100) / len(h)) ** 0.5}
    if with_hits:
        row["hits"] = {"split": split_hits, "loo": loo_hits}
    return row


def test_gaps_are_paired_when_both_runs_kept_their_hits_else_in_quadrature():
    """The paired error of two runs that agree on most queries is far below the quadrature
    one, and equals paired_gap on the same hits."""
    import numpy as np

    from benchmarks.peer_lightly import gaps
    from dinoserve.training.knn import KnnResult, paired_gap

    rng = np.random.default_rng(0)
    peer = rng.random(400) < 0.5
    ours = peer.copy()
    ours[rng.choice(400, 30, replace=False)] ^= True  # the two differ on 30 queries only
    s_peer, s_ours = ("".join("1" if h else "0" for h in x) for x in (peer, ours))
    for with_hits, kind in ((True, "paired"), (False, "quadrature")):
        runs = {"lightly": [{"seed": 0, "epochs": [_epoch(s_peer, s_peer, with_hits)]}],
                "dinoserve": [{"seed": 0, "epochs": [_epoch(s_ours, s_ours, with_hits)]}]}
        rows = gaps(runs)
        assert [(r["protocol"], r["se_kind"]) for r in rows] == [("split", kind), ("loo", kind)]
        gap = 100.0 * (ours.mean() - peer.mean())
        assert rows[0]["dinoserve_minus_lightly"] == round(gap, 2)
        if with_hits:
            expect = paired_gap(*(KnnResult(top1=0, top5=0, n_bank=0, n_query=400, skipped=0, hits=h) for h in (ours, peer)))
            assert rows[0]["se"] == round(expect[1], 2)
            paired = rows[0]["se"]
        else:
            assert rows[0]["se"] > 2 * paired  # quadrature ignores that both scored the same queries
