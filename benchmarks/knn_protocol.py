"""k-NN of several models on the openclipart protocol, both ways, with their errors and floors.

For each evaluation size: the fixed split (bank ``knn_train``, queries ``knn_val``, 343
queries) and leave-one-out over all 1,677 labelled images, each top-1 with its binomial
standard error; raw pixels at the same size; and the random-init floor of each
architecture as the mean and spread over ``--seeds`` initialisations (the reference's
init, as a from-scratch run starts). A model beats another only by more than twice the
larger standard error.

    python -m benchmarks.knn_protocol --sizes 64 96 --seeds 5 \\
        shipped=weights/dinoserve_resnet18_openclipart.safetensors gpu=runs/gpu/r18_sgd_64/teacher.safetensors

Writes ``results/knn_protocol.json`` (or ``--name``).
"""

from __future__ import annotations

import argparse
import json
import statistics

from benchmarks.harness import OPENCLIPART_CSV, machine, write_json


def _row(results: dict) -> dict:
    return {p: {"top1": round(r.top1, 2), "se": round(r.top1_se, 2), "queries": r.n_query} for p, r in results.items()}


def random_init_floor(card, knn_set, seeds: int) -> dict:
    """k-NN of ``seeds`` random initialisations of ``card``'s network: mean, sd, min, max."""
    import torch

    from dinoserve.models import create_backbone
    from dinoserve.training.init import match_reference_init
    from dinoserve.training.knn import evaluate_knn_protocols

    per_protocol: dict[str, list[float]] = {}
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = match_reference_init(create_backbone(card.arch, **card.model_kwargs)).eval()
        for p, r in evaluate_knn_protocols(model, knn_set).items():
            per_protocol.setdefault(p, []).append(r.top1)
    return {p: {"mean": round(statistics.mean(v), 2), "sd": round(statistics.stdev(v), 2) if len(v) > 1 else 0.0,
                "min": round(min(v), 2), "max": round(max(v), 2), "seeds": len(v)}
            for p, v in per_protocol.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="NAME=WEIGHTS (any weight source dinoserve loads)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64])
    ap.add_argument("--seeds", type=int, default=5, help="random initialisations per architecture (0: none)")
    ap.add_argument("--name", default="knn_protocol")
    args = ap.parse_args()

    from dinoserve.models import backbone_card, load_backbone
    from dinoserve.training.knn import evaluate_knn_protocols, prepare_knn_set

    models = {}
    for spec in args.models:
        name, _, weights = spec.partition("=")
        model = load_backbone(weights).eval()
        models[name] = (weights, model, backbone_card(model))
    report: dict = {"protocol": {"csv": str(OPENCLIPART_CSV.name), "k": 20, "temperature": 0.07,
                                 "split": "bank knn_train, queries knn_val", "loo": "each of knn_train + knn_val "
                                 "against all the others"}, "sizes": {}}
    for size in args.sizes:
        knn_set = prepare_knn_set(OPENCLIPART_CSV, size)
        entry = {"raw_pixels": _row(evaluate_knn_protocols(None, knn_set)), "models": {}, "random_init": {}}
        for name, (weights, model, card) in models.items():
            entry["models"][name] = {"weights": weights, "arch": card.arch, **_row(evaluate_knn_protocols(model, knn_set))}
            # a ResNet's input size is not part of its network: one floor per architecture
            kwargs = {k: v for k, v in card.model_kwargs.items() if card.family == "vit" or k != "img_size"}
            key = f"{card.arch} {json.dumps(kwargs, sort_keys=True)}"
            if args.seeds and key not in entry["random_init"]:
                entry["random_init"][key] = random_init_floor(card, knn_set, args.seeds)
            print(size, name, entry["models"][name], flush=True)
        print(size, "raw", entry["raw_pixels"], "random", entry["random_init"], flush=True)
        report["sizes"][str(size)] = entry
    report["machine"] = machine()
    write_json(args.name, report)


if __name__ == "__main__":
    main()
