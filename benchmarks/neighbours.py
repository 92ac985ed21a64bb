"""Searches a person can judge: the nearest openclipart images of a few queries, per model.

k-NN top-1 is one number; this shows what it means. Every labelled openclipart image
(``knn_train`` + ``knn_val``, 23 categories) is embedded at 64 px as the k-NN protocol does,
by raw pixels and by each model; for each image the others are ranked by cosine (leave-one
-out, as in the k-NN protocol) and we report:

- precision@5: the share of the 5 nearest images in the query's own category, over every
  labelled image, with its standard error (and precision@1, the 1-NN classifier);
- the cosine spread: the mean cosine of the nearest image and of random pairs. Features in
  a narrow cone (random pairs at 0.99) rank by small differences a person cannot see;
- for a few fixed queries (the README's ``baby_tux_01.png`` and the first validation image
  of three other categories), the 5 nearest images, their category and cosine;
- the k-NN protocol's leave-one-out top-1 beside it, on the features as they are and
  centred (the labelled set's mean subtracted before the cosine). A ResNet's pooled
  features are non-negative, so they sit in a narrow cone; the k-NN vote exp(sim / 0.07)
  is then nearly uniform over the 20 neighbours. If centring moves k-NN but not
  precision@5, the difference is the vote's, not the ranking's.

    python -m benchmarks.neighbours                       # shipped model, long-run teacher, raw pixels
    python -m benchmarks.neighbours --weights a.safetensors b.pth

Writes ``results/neighbours.json``.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.harness import OPENCLIPART_CSV, REPO, machine, write_json
from dinoserve.shipped import SHIPPED_WEIGHTS
from dinoserve.training.knn import (features_from_pixels, knn_classify_leave_one_out, labelled_items,
                                    preprocess_items, raw_pixel_features)

IMAGE_SIZE = 64
NAMED = ["animals/birds/baby_tux_01.png"]
FIRST_OF = ["food/fruit", "recreation/music", "transportation/roadsigns"]
TOP = 5


def _queries(paths: list[str], categories: list[str], val: set[str]) -> list[int]:
    chosen = [paths.index(p) for p in NAMED if p in paths]
    for category in FIRST_OF:
        first = sorted(p for p, c in zip(paths, categories) if c == category and p in val)
        chosen += [paths.index(first[0])] if first else []
    return chosen


def search_report(features: torch.Tensor, categories: list[str], paths: list[str], queries: list[int],
                  seed: int = 0) -> dict:
    """Leave-one-out precision@5, the cosine spread and the named queries' neighbours."""
    f = F.normalize(features.float(), dim=1)
    sims = f @ f.T
    sims.fill_diagonal_(-math.inf)
    scores, nearest = sims.topk(TOP, dim=1)
    labels = np.array(categories)
    same = labels[nearest.numpy()] == labels[:, None]
    p5 = float(same.mean())
    classes = {c: i for i, c in enumerate(sorted(set(categories)))}
    y = torch.tensor([classes[c] for c in categories])

    def loo_top1(x: torch.Tensor) -> float:
        return round(100 * float((knn_classify_leave_one_out(x, y, num_classes=len(classes)).argmax(1) == y)
                                 .float().mean()), 2)

    per_query = same.mean(axis=1)
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(len(f), (20000,), generator=g), torch.randint(len(f), (20000,), generator=g)
    keep = a != b
    return {
        "precision_at_1": round(100 * float(same[:, 0].mean()), 2),  # the 1-NN classifier
        "precision_at_5": round(100 * p5, 2),
        "precision_at_5_se": round(100 * float(per_query.std(ddof=1)) / math.sqrt(len(per_query)), 2),
        "knn_loo_top1": loo_top1(features), "knn_loo_top1_centred": loo_top1(features - features.mean(0)),
        "mean_cosine_nearest": round(float(scores[:, 0].mean()), 4),
        "mean_cosine_random_pairs": round(float((f[a[keep]] * f[b[keep]]).sum(1).mean()), 4),
        "queries": [{"query": paths[q], "category": categories[q],
                     "nearest": [{"path": paths[j], "category": categories[j], "cosine": round(float(s), 4),
                                  "same_category": categories[j] == categories[q]}
                                 for s, j in zip(scores[q].tolist(), nearest[q].tolist())]}
                    for q in queries],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", nargs="*", help="weight sources to compare (default: the shipped model and "
                                                   "every long run's packaged teacher in weights/progress)")
    ap.add_argument("--data", default=str(OPENCLIPART_CSV), help="labelled CSV (knn_train/knn_val rows)")
    args = ap.parse_args()
    from dinoserve.models import load_backbone

    weights = args.weights or [str(SHIPPED_WEIGHTS), *map(str, sorted((REPO / "weights" / "progress").glob("*.safetensors")))]
    bank, val = labelled_items(args.data)
    items = bank + val
    pixels, kept, skipped = preprocess_items([p for p, _ in items], IMAGE_SIZE)
    root = os.path.commonpath([str(p) for p, _ in items])  # paths as the CSV names them
    paths = [os.path.relpath(items[i][0], root) for i in kept]
    categories = [items[i][1] for i in kept]
    queries = _queries(paths, categories, {paths[k] for k, i in enumerate(kept) if i >= len(bank)})
    models = {"raw pixels": search_report(raw_pixel_features(pixels), categories, paths, queries)}
    for w in weights:
        backbone = load_backbone(w).eval()
        with torch.inference_mode():
            models[str(Path(w).relative_to(REPO)) if Path(w).is_relative_to(REPO) else w] = search_report(
                features_from_pixels(backbone, pixels), categories, paths, queries)
    for name, r in models.items():
        hits = ", ".join(f"{sum(n['same_category'] for n in q['nearest'])}/{TOP}" for q in r["queries"])
        print(f"{name:>45}: precision@1 {r['precision_at_1']:.1f}, @5 {r['precision_at_5']:.1f} ± {r['precision_at_5_se']:.1f} %, k-NN leave-one-out "
              f"{r['knn_loo_top1']:.1f} % (centred {r['knn_loo_top1_centred']:.1f}), cosine nearest "
              f"{r['mean_cosine_nearest']:.3f} / random {r['mean_cosine_random_pairs']:.3f}; named queries {hits}")
    print(write_json("neighbours", {"image_size": IMAGE_SIZE, "images": len(paths), "skipped": len(skipped),
                                    "models": models, "machine": machine()}))


if __name__ == "__main__":
    main()
