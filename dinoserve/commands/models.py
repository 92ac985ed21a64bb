"""`dinoserve models`: list the backbones dinoserve can build."""

from __future__ import annotations

import json

import click


@click.command("models")
@click.argument("pattern", default="*")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model instead of a table.")
def models(pattern: str, as_json: bool) -> None:
    """List DINO aliases, timm resnet*/vit* architectures and DINOv3 ConvNeXts matching PATTERN.

    A plain word matches anywhere in the name (or a ConvNeXt's DINO weight tag); *, ? and
    [...] are shell wildcards. Models too large to export here say why; the largest that
    can be exported say that their weights go to model.onnx.data.

    \b
    Examples:
      dinoserve models dino
      dinoserve models 'vit_small*'
    """
    from dinoserve.models import ALIASES, list_models
    from dinoserve.registry import generation_of, large_model_note, not_exportable

    for name in list_models(pattern):
        alias = ALIASES.get(name)
        why_not = not_exportable(name)
        note = "" if why_not else large_model_note(name)
        if as_json:
            row = {"name": name, "alias": alias is not None, "generation": generation_of(name),
                   "exportable": not why_not}
            if why_not:
                row["reason"] = why_not
            if note:
                row["note"] = note
            if alias:
                row.update(arch=alias.arch, weights=alias.weights, knn_top1=alias.knn_top1,
                           linear_top1=alias.linear_top1)
            click.echo(json.dumps(row))
        elif alias:
            click.echo(f"{name:<16} {alias.arch:<24} k-NN {alias.knn_top1:.1f} / linear "
                       f"{alias.linear_top1:.1f}  {alias.weights}")
        elif why_not or note:
            click.echo(f"{name:<36} {why_not or note}")
        else:
            click.echo(name)
