"""`dinoserve embed`: images in, an .npy of embeddings out."""

from __future__ import annotations

import io
import json
from pathlib import Path

import click

from dinoserve.commands._client_options import client_options, make_client


@click.command("embed")
@click.argument("images", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Where to write float32 [N, D] embeddings (.npy); row i is the i-th kept image.")
@click.option("--no-normalize", is_flag=True, help="Keep raw features instead of L2-normalised ones.")
@click.option("--skip-errors", is_flag=True, help="Leave out unreadable images (reported) instead of failing.")
@client_options
def embed(images, out, no_normalize, skip_errors, url, repo, model, batch_size, timeout, concurrency):
    """Embed IMAGE files with a DINO backbone and save them as a numpy array.

    Prints one JSON object: the output, its shape, the model and any skipped images.

    \b
    Example:
      dinoserve embed photos/*.jpg --out emb.npy
      dinoserve embed a.png b.png --out emb.npy --url http://127.0.0.1:8000
    """
    import numpy as np

    from dinoserve.atomic import atomic_write_bytes

    with make_client(url, repo, model, batch_size, timeout, concurrency) as client:
        # Always embed what can be embedded, so that a failure lists every bad file at once.
        res = client.embed_detailed(list(images), normalize=not no_normalize, on_error="skip")
    if res.skipped and not skip_errors:
        lines = "\n".join(f"  {msg}" for _, msg in res.skipped)
        raise click.ClickException(
            f"{len(res.skipped)} of {len(images)} images cannot be used, nothing was written:\n{lines}\n"
            "Fix or remove them, or pass --skip-errors to leave them out (they are listed in the output)."
        )
    buf = io.BytesIO()
    np.save(buf, res.vectors)
    atomic_write_bytes(Path(out), buf.getvalue())
    click.echo(json.dumps({
        "out": str(out), "shape": list(res.vectors.shape), "model": client.model,
        "paths": [images[i] for i in res.kept],
        "skipped": [{"path": images[i], "error": msg} for i, msg in res.skipped],
    }))
