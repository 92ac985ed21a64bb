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
@click.option("--minutes", type=float, default=6.0, show_default=True,
              help="Training time budget (the whole demo takes about 4 minutes more here).")
@click.option("--weights", "-w", default=None,
              help="Skip training and use these weights (checkpoint, .pth, .safetensors, timm:<tag>, alias).")
@click.option("--arch", default=None, help="Architecture for --weights that do not say it, or to train instead of the preset's.")
@click.option("--image-size", type=int, default=96, show_default=True, help="Evaluation/serving image size.")
@click.option("--fresh", is_flag=True, help="Redo every step instead of reusing finished ones.")
@click.option("--no-app", is_flag=True, help="Print k-NN and example searches, then exit instead of opening the app.")
@click.option("--host", default="127.0.0.1", show_default=True, help="App address (loopback unless you mean it).")
@click.option("--port", type=int, default=7860, show_default=True, help="App port.")
def demo(data, out, repo, name, minutes, weights, arch, image_size, fresh, no_app, host, port) -> None:
    """Train a small DINO model (or take --weights), export it to ONNX, index the images,
    report k-NN accuracy and example searches, then open the app.

    A second run reuses each finished step (checkpoint, export, index) unless --fresh.

    \b
    Examples:
      dinoserve demo                       # openclipart, ~10 minutes, then the app
      dinoserve demo --no-app --minutes 2 --data my_photos/
      dinoserve demo --weights timm:vit_small_patch16_224.dino --arch vit_small_patch16_224
    """
    import json

    from dinoserve.demo import DemoConfig, run_demo

    cfg = DemoConfig(data=data, out=out, repo=repo, name=name, minutes=minutes, weights=weights,
                     arch=arch, image_size=image_size, fresh=fresh)
    result = run_demo(cfg, echo=click.echo)
    summary = {"knn_top1": result.knn_top1, "raw_pixels_top1": result.raw_pixels_top1,
               "checkpoint": result.checkpoint, "model_dir": result.model_dir, "index": result.index,
               "reused": result.reused, "seconds": result.seconds}
    click.echo(json.dumps(summary))
    if no_app:
        return
    from dinoserve.app import launch
    from dinoserve.client import Client

    click.echo(f"app: http://{host}:{port}  (Ctrl-C to stop)")
    launch(Client(repo=repo, model=name), result.index, host=host, port=port)
