"""Train the model dinoserve ships, measure it, and write it under ``weights/`` with its record.

One prepared script, so a long CPU run or a few GPU minutes are not wasted:

1. runs ``dinoserve train <args>`` (the exact command goes into the record; a finished or
   interrupted run in ``--out`` is resumed, not restarted), or takes a finished run as it
   is (``--skip-training``; ``--long-run NAME`` for one of ``benchmarks/long_run.py``);
2. writes the teacher backbone (fp16), at most 25 MB, with its model card in the file's
   metadata, beside ``weights/<name>.safetensors`` as a candidate;
3. measures that file: k-NN top-1 on the openclipart protocol, fixed split and leave-one-out
   with their standard errors, at each ``--eval-sizes`` next to raw pixels at the same size,
   and the attention Jaccard against alpha masks next to random init and a centred box (ViTs);
4. replaces ``weights/<name>.safetensors`` only when the candidate beats the file there and
   raw pixels on both protocols by more than twice the standard error of the gain
   (``--force`` to override). All three are scored on the same queries, so the gain's error
   is the paired one (:func:`dinoserve.training.knn.paired_gap`), not the two models' errors
   added as if they were independent; both go into the record. Then it writes
   ``weights/<name>.json`` (command, commit, device, wall time, epochs, final loss, k-NN, a
   long run's segments, the figures of the model it replaced) and the same record plus the
   machine to ``results/shipped_model.json``.

Examples (the shipped model's own provenance is in its record)::

    .venv/bin/python -m benchmarks.ship_model --name dinoserve_resnet18_openclipart --long-run r18_sgd_64

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
        Path(target).unlink()
        raise SystemExit(f"{target}: {size / 2**20:.1f} MB is over the 25 MB limit; ship a smaller head or model")
    return {**facts, "steps": facts["step"]}


def measure(weights: Path, sizes: list[int], rival: Path | None = None) -> dict:
    """k-NN of ``weights`` and raw pixels at each size, both protocols; at the best size also
    of ``rival`` (the file it would replace, when there), on the same prepared images."""
    from dinoserve.models import backbone_card, file_sha256, load_backbone
    from dinoserve.training.knn import evaluate_knn_protocols, prepare_knn_set

    model = load_backbone(str(weights)).eval()
    card = backbone_card(model)
    knn, sets, results = {}, {}, {}
    for size in sizes:
        sets[size] = prepare_knn_set(OPENCLIPART_CSV, size)
        results[size] = evaluate_knn_protocols(model, sets[size])
        raw = evaluate_knn_protocols(None, sets[size])
        knn[str(size)] = {**figures("model", results[size]), **figures("raw_pixels", raw),
                          "gain_over_raw_pixels": gains(results[size], raw)}
    best = max(knn, key=lambda k: knn[k]["model"])
    out = {"arch": card.arch, "knn_by_eval_size": knn, "image_size": int(best),
           "knn_top1": knn[best]["model"], "raw_pixels_top1": knn[best]["raw_pixels"],
           "knn_loo_top1": knn[best]["model_loo"], "raw_pixels_loo_top1": knn[best]["raw_pixels_loo"]}
    if rival is not None and rival.is_file():
        old = evaluate_knn_protocols(load_backbone(str(rival)).eval(), sets[int(best)])
        out["replaced"] = {"sha256": file_sha256(rival), "at_image_size": int(best), **figures("model", old),
                           "gain_over_it": gains(results[int(best)], old)}
    if card.family == "vit":
        out["attention"] = attention(model, int(best))
    return out


def figures(who: str, results: dict) -> dict:
    """``evaluate_knn_protocols``' results as ``who``, ``who_se``, ``who_loo``, ``who_loo_se``."""
    split, loo = results["split"], results["loo"]
    return {who: round(split.top1, 2), f"{who}_se": round(split.top1_se, 2),
            f"{who}_loo": round(loo.top1, 2), f"{who}_loo_se": round(loo.top1_se, 2)}


def gains(new: dict, rival: dict) -> dict:
    """Per protocol, ``new``'s top-1 minus ``rival``'s on the same queries and the paired
    standard error of that gain (:func:`~dinoserve.training.knn.paired_gap`)."""
    from dinoserve.training.knn import paired_gap

    out = {}
    for protocol in new:
        gap, se = paired_gap(new[protocol], rival[protocol])
        out[protocol] = {"gain": round(gap, 2), "se": round(se, 2)}
    return out


def wins(new: dict, old: dict) -> list[str]:
    """Why ``new`` (one size of ``knn_by_eval_size``) may not replace ``old`` (its ``replaced``
    figures): empty when it beats the shipped model and raw pixels on both protocols by more
    than twice the standard error of the gain."""
    reasons = []
    for key, protocol in (("split", "fixed split"), ("loo", "leave-one-out")):
        for rival, gain in (("the shipped model", old["gain_over_it"][key]),
                            ("raw pixels", new["gain_over_raw_pixels"][key])):
            if gain["gain"] <= 2 * gain["se"]:
                reasons.append(f"{protocol}: {gain['gain']:+.1f} points over {rival} is not more than twice "
                               f"the gain's paired standard error ({2 * gain['se']:.1f})")
    return reasons


def long_run_lineage(name: str) -> dict:
    """What a long run's packaged record says about how its teacher was made."""
    from benchmarks.long_run import PROGRESS, curve_points, read_long_run_record, repo_relative

    record = read_long_run_record(name)
    if record is None:
        raise SystemExit(f"{name}: no packaged record in {PROGRESS}; run `python -m benchmarks.long_run package {name}`")
    segments = [*record["earlier_segments"], record]
    _, _, hours = curve_points(record)
    return {"long_run": name, "record": repo_relative(PROGRESS / f"{name}.json"), "recipe": record["recipe"],
            "started_from": segments[0].get("segment_started_from"),
            "segments": [{k: seg.get(k) for k in ("segment", "first_epoch", "epochs_this_segment",
                                                  "cpu_hours_this_segment")} for seg in segments],
            "cpu_hours": round(hours, 2)}


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
    ap.add_argument("--out", type=Path, help="training run folder")
    ap.add_argument("--long-run", metavar="NAME",
                    help="ship the finished long run NAME (benchmarks/long_run.py): its checkpoint, as it is")
    ap.add_argument("--eval-sizes", type=int, nargs="+", default=[48, 64, 96])
    ap.add_argument("--skip-training", action="store_true", help="package and measure the run in --out as it is")
    ap.add_argument("--force", action="store_true",
                    help="replace weights/<name> even when the new model does not win by two standard errors")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: options of dinoserve train")
    args = ap.parse_args()
    if args.long_run:
        from benchmarks.long_run import run_dir

        args.out, args.skip_training = run_dir(args.long_run), True
    if args.out is None:
        ap.error("give --out (a training run folder) or --long-run NAME")
    lineage = long_run_lineage(args.long_run) if args.long_run else {}  # before anything is written
    train_args = [a for a in args.train_args if a != "--"]
    command, minutes = (None, 0.0) if args.skip_training else train(args.out, train_args)
    log = [json.loads(line) for line in (args.out / "log.jsonl").read_text().splitlines()]
    ends = [r for r in log if r["event"] == "end"]
    target = REPO / "weights" / f"{args.name}.safetensors"
    candidate = target.with_name(f".{target.stem}.candidate.safetensors")  # weights/ changes only for a winner
    facts = write_weights(args.out / "checkpoint.pth", candidate)
    from dinoserve.atomic import atomic_write_text
    from dinoserve.models import file_sha256

    measured = measure(candidate, args.eval_sizes, rival=target)
    if "replaced" in measured:
        reasons = wins(measured["knn_by_eval_size"][str(measured["image_size"])], measured["replaced"])
        if reasons and not args.force:
            candidate.unlink()
            raise SystemExit(f"{target} stays: the new model does not win ({'; '.join(reasons)}); --force ships it anyway")
    record = {
        "name": args.name, "file": f"weights/{target.name}", "file_sha256": file_sha256(candidate),
        "megabytes": round(candidate.stat().st_size / 2**20, 2),
        "command": shlex.join(command) if command else None, "train_args": facts["args"],
        "epochs": facts["epoch"], "steps": facts["steps"],
        "final_loss": ends[-1]["final_loss"] if ends else None,
        "invocations": sum(1 for r in log if r["event"] == "start"),  # the same command, resumed after a time limit
        "train_minutes_total": round(train_seconds(log) / 60, 1),
        "device": log[0].get("device"), "precision": log[0].get("precision"),
        **lineage,
        **measured,
        "machine": machine(),
        "note": "image_size is the evaluation size with the best k-NN top-1 among eval sizes on knn_val",
    }
    # the record is complete before the weights move, and both moves are renames: an
    # interruption leaves the old pair, or new weights the demo refuses by their sha256
    candidate.replace(target)
    atomic_write_text(target.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    write_json("shipped_model", record)
    print(json.dumps({k: record[k] for k in ("file", "megabytes", "epochs", "knn_top1", "raw_pixels_top1",
                                             "knn_loo_top1", "raw_pixels_loo_top1")}))


if __name__ == "__main__":
    main()
