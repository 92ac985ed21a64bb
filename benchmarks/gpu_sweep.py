"""A short recipe sweep for the cpu_small preset on a CUDA GPU, ranked by k-NN top-1.

Each recipe trains ``dinoserve.training.train`` for the same wall-clock budget on openclipart
(knn_train + pool, thumbnails of at most 128 px), then is evaluated with the DINO k-NN
protocol on thumbnails of knn_train (bank) / knn_val (queries) at 64 and 96 px. Thumbnail
k-NN tracks the full-resolution protocol closely (47.2 vs 47.8 % for one model), so the
ranking carries over; the best model's teacher comes back for the full protocol.

    python -m benchmarks.gpu_sweep --data TRAIN_DIR --knn KNN_DIR --out OUT [--seconds 36]

OUT/gpu_sweep.json (rewritten after every recipe), OUT/best_a|b.safetensors.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_train import save_teacher_halves
from dinoserve.models import load_backbone
from dinoserve.training import make_config, train
from dinoserve.training.knn import evaluate_knn_set, prepare_knn_set

FAST = dict(out_dim=1024, lr=1e-3, norm_last_layer=False, warmup_epochs=1)
RECIPES = {
    "cpu_small": {},
    "fast_head": FAST,
    "fast_head_6_locals": dict(FAST, local_crops=6),
    "fast_head_temp_boost": dict(FAST, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=2),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--knn", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=36)
    ap.add_argument("--rate", type=float, default=1900.0, help="expected img/s, to size epochs")
    ap.add_argument("--workers", type=int, default=14)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    n_images = sum(1 for _ in Path(args.data).glob("*.png"))
    sets = {size: prepare_knn_set(args.knn, size) for size in (64, 96)}
    rows, best = [], None
    for name, recipe in RECIPES.items():
        epochs = max(1, int(args.seconds * args.rate / n_images))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.monotonic()
            result = train(make_config("cpu_small", data=args.data, out=tmp, device="cuda", epochs=epochs,
                                       time_limit=args.seconds / 60, num_workers=args.workers,
                                       progress=False, log_every=50, **recipe))
            model = load_backbone(Path(tmp) / "checkpoint.pth").to("cuda").eval()
            knn = {size: evaluate_knn_set(model, s, device="cuda").top1 for size, s in sets.items()}
            row = dict(recipe=name, overrides=recipe, epochs_planned=epochs, epochs_done=result.epochs_done,
                       steps=result.steps, final_loss=result.final_loss, img_per_s=result.images_per_second,
                       knn_top1_64=knn[64], knn_top1_96=knn[96], wall_s=round(time.monotonic() - start, 1))
            print(json.dumps(row), flush=True)
            rows.append(row)
            score = max(knn.values())
            if best is None or score > best:
                best = score
                save_teacher_halves(Path(tmp) / "checkpoint.pth", args.out, prefix="best")
                row["saved"] = True
        (args.out / "gpu_sweep.json").write_text(json.dumps(
            dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, seconds_each=args.seconds,
                 rows=rows), indent=2))


if __name__ == "__main__":
    main()
