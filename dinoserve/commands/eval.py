"""`dinoserve eval`: evaluate backbone features (k-NN on a labelled set)."""

from __future__ import annotations

import json

import click


@click.group("eval")
def eval_() -> None:
    """Evaluate the features of any weights."""


@eval_.command("knn")
@click.option("--weights", "-w", required=True,
              help="Weight source: a dinoserve checkpoint or output folder, an official DINO .pth, "
                   "timm:<arch>.<tag>, a .safetensors file, or an alias such as dino_vits16.")
@click.option("--arch", default=None, help="timm architecture, when it cannot be read from the weights.")
@click.option("--checkpoint-key", type=click.Choice(["teacher", "student"]), default="teacher",
              show_default=True, help="Which network of a training checkpoint to evaluate.")
@click.option("--data", "-d", required=True, type=click.Path(path_type=str),
              help="A CSV file list (path,category,split: bank = knn_train, queries = knn_val) or "
                   "a folder with train/<class>/ and val/<class>/ subfolders.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Folder that relative CSV paths resolve against (default: the known install "
                   "folder of a known list, else the CSV's own folder).")
@click.option("--image-size", type=click.IntRange(min=8), default=None,
              help="Evaluation image size (default: the model's own).")
@click.option("-k", "k", type=click.IntRange(min=1), default=20, show_default=True, help="Neighbours that vote.")
@click.option("--temperature", "-t", type=click.FloatRange(min=0, min_open=True), default=0.07,
              show_default=True, help="Vote weight exp(similarity / T).")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="auto", show_default=True,
              help="torch device: auto (cuda if available, else cpu), cpu, cuda or cuda:N.")
@click.option("--protocol", type=click.Choice(["split", "loo", "both"]), default="both", show_default=True,
              help="split: bank = train, queries = val (the fixed protocol); loo: leave-one-out over every "
                   "labelled image (about 2x smaller standard error on openclipart); both.")
@click.option("--against", default=None, metavar="WEIGHTS|pixels",
              help="A second model (any weight source, its teacher) or 'pixels' (the raw-pixel baseline), "
                   "scored on the same prepared images: prints the gain over it with its paired standard error.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def knn(weights: str, arch: str | None, checkpoint_key: str, data: str, data_root: str | None,
        image_size: int | None, k: int, temperature: float, batch_size: int, device: str,
        protocol: str, against: str | None, as_json: bool) -> None:
    """k-NN top-1/top-5 of backbone features on a labelled set (the DINO protocol:
    L2-normalised features, cosine top-k, votes weighted exp(sim / T)), each top-1 with its
    standard error. To tell two models apart, score them on the same queries with
    ``--against``: the gain counts only when it is larger than twice its paired standard error.

    \b
    Example:
      dinoserve eval knn --weights runs/clipart --data openclipart_knn.csv --against pixels
      dinoserve eval knn -w runs/new -d openclipart_knn.csv --against weights/old.safetensors
      dinoserve eval knn -w dino_vits16 -d my_labelled_folder --image-size 224 --json
    """
    from dinoserve.models import backbone_card, load_backbone
    from dinoserve.training.distributed import resolve_device
    from dinoserve.training.knn import PROTOCOLS, evaluate_knn_protocols, paired_gap, prepare_knn_set

    device = resolve_device(device)  # the resolver training uses
    model = load_backbone(weights, arch, checkpoint_key=checkpoint_key).to(device)
    card = backbone_card(model)
    size = image_size or card.image_size
    protocols = PROTOCOLS if protocol == "both" else (protocol,)
    knn_set = prepare_knn_set(data, size, root=data_root, fit=card.fit)
    options = dict(k=k, temperature=temperature, batch_size=batch_size, device=device)
    results = evaluate_knn_protocols(model, knn_set, protocols, **options)
    rival = None
    if against is not None:
        # the rival sees the very same prepared images, so its hits pair with ours query by query
        other = None if against == "pixels" else load_backbone(against, checkpoint_key=checkpoint_key).to(device)
        rival = evaluate_knn_protocols(other, knn_set, protocols, **options)
    gains = {p: paired_gap(results[p], rival[p]) for p in protocols} if rival else {}
    if as_json:
        first = results[protocols[0]]  # the top level keeps the single-protocol layout
        out = {"weights": weights, "arch": card.arch, "image_size": size, "data": data,
               **first.to_dict(), "protocols": {p: r.to_dict() for p, r in results.items()}}
        if rival:
            out["against"] = {"weights": against, "protocols": {
                p: {**rival[p].to_dict(), "gain": round(g, 2), "gain_se": round(se, 2), "beyond_2se": abs(g) > 2 * se}
                for p, (g, se) in gains.items()}}
        click.echo(json.dumps(out))
        return
    for p, r in results.items():
        click.echo(f"{card.arch} @ {size}px, k={k}, T={temperature}, {p}: top-1 {r.top1:.2f} ± {r.top1_se:.2f} %  "
                   f"top-5 {r.top5:.2f} %  (bank {r.n_bank}, queries {r.n_query}, skipped {r.skipped})")
        if rival:
            g, se = gains[p]
            verdict = "a difference" if abs(g) > 2 * se else "within twice its error: not a difference"
            click.echo(f"  against {against}: top-1 {rival[p].top1:.2f} %; gain {g:+.2f} ± {se:.2f} points "
                       f"(paired), {verdict}")


@eval_.command("attention")
@click.option("--weights", "-w", required=True, help="Weight source of a ViT (as for `eval knn`).")
@click.option("--arch", default=None, help="timm architecture, when it cannot be read from the weights.")
@click.option("--checkpoint-key", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True)
@click.option("--data", "-d", required=True, type=click.Path(path_type=str),
              help="PNGs with transparency: a folder, or a CSV file list (then rows of --split).")
@click.option("--split", default="knn_val", show_default=True, help="CSV only: rows of this split.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Folder that relative CSV paths resolve against.")
@click.option("--image-size", type=click.IntRange(min=8), default=None, help="Evaluation size (default: the model's own).")
@click.option("--mass", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.6, show_default=True,
              help="Keep the smallest set of patches holding this share of the attention (the paper: 0.6).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def attention(weights: str, arch: str | None, checkpoint_key: str, data: str, split: str, data_root: str | None,
              image_size: int | None, mass: float, as_json: bool) -> None:
    """Jaccard of a ViT's thresholded CLS attention with the images' alpha masks, next to
    the same ViT at random init and a centred box of the object's size.

    \b
    Example:
      dinoserve eval attention -w weights/dinoserve_resnet18_openclipart.safetensors \\
          -d data/openclipart_knn.csv
    """
    import torch

    from dinoserve.errors import DataError
    from dinoserve.models import backbone_card, create_backbone, load_backbone
    from dinoserve.training.attention_eval import attention_jaccard, load_masked_set
    from dinoserve.filelist import find_images
    from dinoserve.training.init import match_reference_init

    model = load_backbone(weights, arch, checkpoint_key=checkpoint_key)
    card = backbone_card(model)
    if card.family != "vit":
        raise DataError(f"{weights}: {card.arch} is not a ViT; attention maps exist for ViT models only")
    size = image_size or card.image_size
    masked = load_masked_set(find_images(data, [split] if data.endswith(".csv") else None, data_root), size)
    if not len(masked.paths):
        raise DataError(f"{data}: no image with a transparent background to score ({len(masked.skipped)} skipped)")
    trained = attention_jaccard(model, masked, mass)
    torch.manual_seed(0)
    random_init = match_reference_init(create_backbone(card.arch, img_size=card.image_size, patch_size=card.patch_size,
                                                       depth=len(model.blocks)))
    baseline = attention_jaccard(random_init, masked, mass)
    out = {"weights": weights, "arch": card.arch, **trained.to_dict(), "random_init": baseline.jaccard,
           "skipped": len(masked.skipped)}
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(f"{card.arch} @ {size}px, {trained.images} images, mass {mass}: Jaccard {trained.jaccard:.1f} %  "
                   f"(random init {baseline.jaccard:.1f} %, centred box {trained.centred_box:.1f} %)")
