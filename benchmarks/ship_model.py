"""Train the model dinoserve ships, measure it, and write it under ``weights/`` with its record.

One prepared script, so a long CPU run or a few GPU minutes are not wasted:

1. runs ``dinoserve train <args>`` (the exact command goes into the record; a finished or
   interrupted run in ``--out`` is resumed, not restarted);
2. writes the teacher backbone (fp16) to ``weights/<name>.safetensors``, at most 25 MB, with
   its model card in the file's metadata;
3. measures the shipped file itself: k-NN top-1 on the openclipart protocol at each
   ``--eval-sizes`` next to raw pixels at the same size, and the attention Jaccard against
   alpha masks next to random init and a centred box (ViTs);
4. writes ``weights/<name>.json`` (command, commit, device, wall time, epochs, final loss,
   k-NN, attention) and the same record plus the machine to ``results/shipped_model.json``.

Example (the shipped model's own command is in its record)::

    nice -n -5 .venv/bin/python -m benchmarks.ship_model --name dinoserve_resnet18_openclipart \\
        --out runs/shipped -- -p cpu_small -a vit_tiny_patch16_224 --patch-size 8 ... --time-limit 70
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import OPENCLIPART_CSV, REPO, machine, train_seconds, write_json

MAX_BYTES = 25 * 1024 * 1024


def train(out: Path, args: list[str]) -> tuple[list[str], float]:
    """Run (or resume) the training command; returns it and its wall-clock minutes."""
    resume = ["--resume"] if (out / "checkpoint.pth").is_file() else []  # the same command continues
    cmd = ["dinoserve", "train", "-d", str(OPENCLIPART_CSV.relative_to(REPO)), "--split", "knn_train,pool",
           "-o", str(out), *args]
    t0 = time.time()
    subprocess.run([str(Path(sys.executable).parent / cmd[0]), *cmd[1:], *resume], cwd=REPO, check=True)
    return cmd, (time.time() - t0) / 60


def write_weights(checkpoint: Path, target: Path) -> dict:
    """Teacher backbone in fp16 safetensors with the card in the metadata, at most 25 MB."""
    from dinoserve.training.checkpoint import package_teacher

    facts = package_teacher(checkpoint, target)
    size = target.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{target}: {size / 2**20:.1f} MB is over the 25 MB limit; ship a smaller head or model")
    return {**facts, "steps": facts["step"]}


def measure(weights: Path, sizes: list[int]) -> dict:
    from dinoserve.models import backbone_card, load_backbone
    from dinoserve.training.knn import evaluate_knn_set, prepare_knn_set

    model = load_backbone(str(weights)).eval()
    card = backbone_card(model)
    knn = {}
    for size in sizes:
        s = prepare_knn_set(OPENCLIPART_CSV, size)
        knn[str(size)] = {"model": round(evaluate_knn_set(model, s).top1, 2),
                          "raw_pixels": round(evaluate_knn_set(None, s).top1, 2)}
    best = max(knn, key=lambda k: knn[k]["model"])
    out = {"arch": card.arch, "knn_by_eval_size": knn, "image_size": int(best),
           "knn_top1": knn[best]["model"], "raw_pixels_top1": knn[best]["raw_pixels"]}
    if card.family == "vit":
        out["attention"] = attention(model, int(best))
    return out


def attention(model, size: int) -> dict:
    import torch

    from dinoserve.filelist import read_file_list
    from dinoserve.models import backbone_card, create_backbone
    from dinoserve.training.attention_eval import attention_jaccard, load_masked_set
    from dinoserve.training.init import match_reference_init

    card = backbone_card(model)
    masked = load_masked_set([e.path for e in read_file_list(OPENCLIPART_CSV, ["knn_val"])], size)
    trained = attention_jaccard(model, masked)
    torch.manual_seed(0)
    random_init = match_reference_init(create_backbone(card.arch, img_size=card.image_size,
                                                       patch_size=card.patch_size, depth=len(model.blocks)))
    return {"jaccard": round(trained.jaccard, 2), "random_init": round(attention_jaccard(random_init, masked).jaccard, 2),
            "centred_box": round(trained.centred_box, 2), "images": trained.images, "mass": trained.mass,
            "image_size": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", type=Path, required=True, help="training run folder")
    ap.add_argument("--eval-sizes", type=int, nargs="+", default=[48, 64, 96])
    ap.add_argument("--skip-training", action="store_true", help="package and measure the run in --out as it is")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: options of dinoserve train")
    args = ap.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    command, minutes = (None, 0.0) if args.skip_training else train(args.out, train_args)
    log = [json.loads(line) for line in (args.out / "log.jsonl").read_text().splitlines()]
    ends = [r for r in log if r["event"] == "end"]
    target = REPO / "weights" / f"{args.name}.safetensors"
    facts = write_weights(args.out / "checkpoint.pth", target)
    from dinoserve.models import file_sha256

    record = {
        "name": args.name, "file": f"weights/{target.name}", "file_sha256": file_sha256(target),
        "megabytes": round(target.stat().st_size / 2**20, 2),
        "command": shlex.join(command) if command else None, "train_args": facts["args"],
        "epochs": facts["epoch"], "steps": facts["steps"],
        "final_loss": ends[-1]["final_loss"] if ends else None,
        "invocations": sum(1 for r in log if r["event"] == "start"),  # the same command, resumed after a time limit
        "train_minutes_total": round(train_seconds(log) / 60, 1),
        "device": log[0].get("device"), "precision": log[0].get("precision"),
        **measure(target, args.eval_sizes),
        "machine": machine(),
        "note": "image_size is the evaluation size with the best k-NN top-1 among eval sizes on knn_val",
    }
    target.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    write_json("shipped_model", record)
    print(json.dumps({k: record[k] for k in ("file", "megabytes", "epochs", "knn_top1", "raw_pixels_top1")}))


if __name__ == "__main__":
    main()
