"""Multi-crop augmentation speed: batched tensor ops against the PIL reference, side by side.

Two measurements, interleaved in one run so machine load hits both alike:

``augment``  images/s of the augmentation alone on openclipart's decoded-image store
             (cpu_small crops: 2 x 64 + 4 x 32 px): ``BatchMultiCrop`` on a batch, against
             ``MultiCropAugment`` image by image in this process (what one DataLoader worker does).
``train``    ``dinoserve.training.train`` itself for ``--steps`` steps with ``--augment tensor``
             and ``--augment pil`` (``--num-workers`` workers): training images/s and the share
             of loop time spent waiting for batches.

Writes ``results/augment_throughput.json`` with the CPU's features::

    .venv/bin/python -m benchmarks.augment_throughput --steps 20
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from pathlib import Path

from benchmarks.harness import OPENCLIPART_CSV, machine, median_seconds_in_turns, write_json

NAME = "augment_throughput"


def augment_rates(pixels, batch: int, repeats: int) -> dict:
    import torch
    from PIL import Image

    from dinoserve.training.augment import MultiCropAugment
    from dinoserve.training.tensor_augment import BatchMultiCrop

    args = (64, (0.25, 1.0), 4, 32, (0.05, 0.25))
    tensor_aug, pil_aug = BatchMultiCrop(*args), MultiCropAugment(*args)
    images = torch.from_numpy(pixels[:batch].copy())
    pil_images = [Image.fromarray(p.transpose(1, 2, 0)) for p in pixels[:batch]]
    tensor_aug(images, torch.Generator().manual_seed(0))  # warm-up

    def pil_batch(r: int) -> None:
        for i, img in enumerate(pil_images):
            pil_aug(img, random.Random(r * batch + i))

    median_s = median_seconds_in_turns({"tensor": lambda r: tensor_aug(images, torch.Generator().manual_seed(r)),
                                        "pil": pil_batch}, repeats, warmup=0)
    tensor_rate, pil_rate = batch / median_s["tensor"], batch / median_s["pil"]
    return {"batch": batch, "tensor_img_per_s": round(tensor_rate, 1), "pil_img_per_s_one_process": round(pil_rate, 1),
            "ratio_tensor_to_pil": round(tensor_rate / pil_rate, 2)}


def train_rates(steps: int, workers: int) -> dict:
    from dinoserve.training import make_config, train

    rows = {}
    for mode in ("tensor", "pil"):
        out = Path(tempfile.mkdtemp(prefix=f"augbench-{mode}-"))
        try:
            r = train(make_config("cpu_small", data=str(OPENCLIPART_CSV), split=("knn_train", "pool"), out=str(out / "run"),
                                  augment=mode, num_workers=workers, max_steps=steps, progress=False, log_every=1000))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        rows[mode] = {"img_per_s": r.images_per_second, "data_wait_share": r.data_wait_share, "precision": r.precision}
    rows["ratio_tensor_to_pil"] = round(rows["tensor"]["img_per_s"] / rows["pil"]["img_per_s"], 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="training steps per pipeline")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the PIL pipeline")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from dinoserve.filelist import find_images
    from dinoserve.training.store import open_store

    store = open_store(find_images(OPENCLIPART_CSV, ["knn_train", "pool"]), 96)
    result = {"augment": augment_rates(store.pixels, 64, args.repeats),
              "train": train_rates(args.steps, args.workers), "steps": args.steps, "workers": args.workers,
              "machine": machine()}
    write_json(NAME, result)
    print(result)


if __name__ == "__main__":
    main()
