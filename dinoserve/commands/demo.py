"""`dinoserve demo`: the whole product on real images, offline, in about ten minutes."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--data", "-d", type=click.Path(exists=True), default=None,
              help="Image folder or CSV file list (default: openclipart from Debian, `apt-get install -y openclipart-png`).")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="demo-run", show_default=True,
              help="Folder for the checkpoint, index, demo.json (finished steps) and result.json.")
@click.option("--repo", type=click.Path(file_okay=False), default="model_repository", show_default=True,
              help="Triton model repository to export into.")
@click.option("--name", default="dino_demo", show_default=True, help="Model name in the repository.")
@click.option("--minutes", type=click.FloatRange(min=0), default=None,
              help="Training time: fine-tuning the shipped model (0: serve it as it is), or --from-scratch training. "
                   "Default 6, except on openclipart with the shipped model, which was trained on those very "
                   "images: 0 there.")
@click.option("--from-scratch", is_flag=True,
              help="Train from random initialisation (cpu_small) instead of fine-tuning the shipped model.")
@click.option("--base", type=click.Path(dir_okay=False), default=None,
              help="Model to fine-tune, with its record (<name>.json) beside it (default: the shipped "
                   "weights/dinoserve_resnet18_openclipart.safetensors).")
@click.option("--weights", "-w", default=None,
              help="Skip training and serve these weights (checkpoint, .pth, .safetensors, timm:<tag>, alias).")
@click.option("--arch", default=None, help="Architecture for --weights that do not say it, or for --from-scratch.")
@click.option("--image-size", type=click.IntRange(min=8), default=None,
              help="Evaluation/serving image size (default: the model card's: the shipped model's, the training "
                   "crop for --from-scratch, the card of --weights).")
@click.option("--fresh", is_flag=True, help="Redo every step instead of reusing finished ones.")
@click.option("--no-app", is_flag=True, help="Print k-NN and example searches, then exit instead of opening the app.")
@click.option("--host", default="127.0.0.1", show_default=True, help="App address (loopback unless you mean it).")
@click.option("--port", type=int, default=7860, show_default=True, help="App port.")
def demo(data, out, repo, name, minutes, from_scratch, base, weights, arch, image_size, fresh, no_app, host, port) -> None:
    """Fine-tune the shipped DINO model on your images for a few minutes (or train one from
    scratch, or take --weights), compare k-NN with the shipped model and raw pixels, export
    the better model to ONNX, index the images, show example searches, then open the app.
    On openclipart (the default data, the shipped model's own training images) it serves
    the shipped model as it is unless --minutes is given.

    A second run reuses each finished step (training, k-NN, export, index) unless --fresh.

    \b
    Examples:
      dinoserve demo                       # openclipart, the shipped model, about 2 minutes, then the app
      dinoserve demo --no-app --minutes 2 --data my_photos/
      dinoserve demo --from-scratch --minutes 10
      dinoserve demo --weights timm:vit_small_patch16_224.dino --arch vit_small_patch16_224
    """
    import json

    from dinoserve.commands.demo_pipeline import DemoConfig, run_demo

    if weights and from_scratch:
        raise click.UsageError("--weights and --from-scratch exclude each other: one says which model to serve")
    cfg = DemoConfig(data=data, out=out, repo=repo, name=name, minutes=minutes, weights=weights,
                     from_scratch=from_scratch, arch=arch, image_size=image_size, fresh=fresh,
                     **({"shipped": base} if base else {}))
    result = run_demo(cfg, echo=click.echo)
    summary = {"knn_top1": result.knn, "knn_loo_top1": result.knn_loo, "served": result.served, "why_served": result.why_served,
               "model_dir": result.model_dir, "index": result.index, "reused": result.reused,
               "seconds": result.seconds}
    click.echo(json.dumps(summary))
    if no_app:
        return
    from dinoserve.app import serve_app
    from dinoserve.client import Client

    with Client(repo=repo, model=name) as client:
        serve_app(client, result.index, host=host, port=port, echo=lambda m: click.echo(m, err=True))
