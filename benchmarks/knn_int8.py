"""k-NN top-1 on the openclipart protocol for an fp32 export and its int8 export, side by side.

The shipped model (``weights/dinoserve_resnet18_openclipart.safetensors``, 64 px) is
exported twice with :func:`dinoserve.export.export_onnx`: fp32, and ``int8=True``
calibrated on a sample of the ``pool`` split (never the k-NN queries). Both ONNX graphs embed
the protocol's bank (``knn_train``) and queries (``knn_val``) with onnxruntime, and the same
k-NN (k = 20, T = 0.07) scores them. Also records the int8 gate figures and the mean cosine
to fp32 on the protocol images themselves.

    .venv/bin/python benchmarks/knn_int8.py [--weights W] [--image-size 64] [--calibration-images 256]

Writes ``benchmarks/results/knn_int8.json``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._results import OPENCLIPART_CSV, REPO, machine, write_json  # noqa: E402
from dinoserve.export import export_onnx  # noqa: E402
from dinoserve.filelist import read_file_list  # noqa: E402
from dinoserve.models import load_backbone  # noqa: E402
from dinoserve.ort_session import open_session  # noqa: E402
from dinoserve.training.knn import knn_scores, prepare_knn_set  # noqa: E402

NAME = "knn_int8"
SHIPPED = REPO / "weights" / "dinoserve_resnet18_openclipart.safetensors"


def embed(path: Path, pixels: np.ndarray, batch: int = 64) -> np.ndarray:
    session = open_session(path, device="cpu")
    return np.concatenate([session.run(["embedding"], {"images": pixels[i:i + batch]})[0]
                           for i in range(0, len(pixels), batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(SHIPPED))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--calibration-images", type=int, default=256)
    args = ap.parse_args()

    model = load_backbone(args.weights)
    pool = [str(e.path) for e in read_file_list(OPENCLIPART_CSV, splits="pool") if e.path.is_file()]
    calib = sorted(random.Random(0).sample(pool, args.calibration_images))
    repo = Path(tempfile.mkdtemp(prefix="dinoserve-knn-int8-")) / "model_repository"
    t0 = time.time()
    fp32 = export_onnx(model=model, name="fp32", repo=repo, image_size=args.image_size)
    int8 = export_onnx(model=model, name="int8", repo=repo, image_size=args.image_size, int8=True, calibration=calib)
    print("int8 gate:", int8.int8.describe(), f"({time.time() - t0:.0f} s for both exports)", flush=True)

    knn_set = prepare_knn_set(OPENCLIPART_CSV, args.image_size)
    rows, feats = {}, {}
    for label, res in (("fp32", fp32), ("int8", int8)):
        bank, queries = embed(res.onnx_path, knn_set.bank_pixels), embed(res.onnx_path, knn_set.query_pixels)
        feats[label] = np.concatenate([bank, queries])
        r = knn_scores(torch.from_numpy(bank), torch.from_numpy(queries), knn_set)
        rows[label] = r.to_dict()
        print(f"{label}: k-NN top-1 {r.top1:.2f} %  top-5 {r.top5:.2f} %", flush=True)
    a, b = feats["fp32"].astype(np.float64), feats["int8"].astype(np.float64)
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    data = {
        "what": "k-NN top-1 on openclipart (bank knn_train, queries knn_val, k=20, T=0.07): fp32 vs int8 export",
        "weights": args.weights, "image_size": args.image_size,
        "calibration": f"{len(calib)} images of the pool split (seed 0)",
        "int8_gate": int8.int8.to_dict(),
        "knn": rows, "top1_drop_points": rows["fp32"]["top1"] - rows["int8"]["top1"],
        "protocol_images_cosine_int8_vs_fp32": {"mean": float(cos.mean()), "min": float(cos.min()),
                                                "n": int(len(cos))},
        "machine": machine(), "command": "python benchmarks/knn_int8.py " + " ".join(sys.argv[1:]),
    }
    print(f"top-1 drop {data['top1_drop_points']:.2f} points; protocol cosine mean {cos.mean():.5f} min {cos.min():.5f}")
    print("wrote", write_json(NAME, data))


if __name__ == "__main__":
    main()
