"""`dinoserve embed`: images in, an .npy of embeddings out."""

from __future__ import annotations

import io
import json
from pathlib import Path

import click

from dinoserve.commands._client_options import client_options, make_client
from dinoserve.commands._ray_options import engine_options, ray_options


@click.command("embed")
@click.argument("images", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Where to write float32 [N, D] embeddings (.npy); row i is the i-th kept image.")
@click.option("--no-normalize", is_flag=True, help="Keep raw features instead of L2-normalised ones.")
@click.option("--skip-errors", is_flag=True, help="Leave out unreadable images (reported) instead of failing.")
@client_options
@engine_options
def embed(images, out, no_normalize, skip_errors, url, repo, model, batch_size, timeout, concurrency,
          engine, ray_address, actors, actor_cpus, shard_size, shards_dir, keep_shards):
    """Embed IMAGE files with a DINO backbone and save them as a numpy array.

    Prints one JSON object: the output, its shape, the model and any skipped images. With
    --engine ray, IMAGE may also be one folder (recursive) or one CSV file list.

    \b
    Example:
      dinoserve embed photos/*.jpg --out emb.npy
      dinoserve embed a.png b.png --out emb.npy --url http://127.0.0.1:8000
      dinoserve embed photos/ --out emb.npy --engine ray --ray-address auto
    """
    import numpy as np

    from dinoserve.atomic import atomic_write_bytes

    if engine == "ray":
        from dinoserve.ray_engine import default_shards_dir, embed_paths, expand_sources

        paths, _ = expand_sources(images)
        shards = shards_dir or default_shards_dir(out)
        run = embed_paths(paths, shards, ray_options(url, repo, model, batch_size, timeout, ray_address, actors,
                                                     actor_cpus, shard_size, progress=False),
                          mode="embed", normalize=not no_normalize)
        vectors, kept, skipped, model_name = run.embeddings, [r["path"] for r in run.rows], run.skipped, run.info.name
    else:
        paths = list(images)
        with make_client(url, repo, model, batch_size, timeout, concurrency) as client:
            # Always embed what can be embedded, so that a failure lists every bad file at once.
            res = client.embed_detailed(paths, normalize=not no_normalize, on_error="skip")
        vectors, kept, model_name = res.vectors, [paths[i] for i in res.kept], client.model
        skipped = [(paths[i], msg) for i, msg in res.skipped]
    if skipped and not skip_errors:
        lines = "\n".join(f"  {msg}" for _, msg in skipped)
        raise click.ClickException(
            f"{len(skipped)} of {len(paths)} images cannot be used, nothing was written:\n{lines}\n"
            "Fix or remove them, or pass --skip-errors to leave them out (they are listed in the output)."
        )
    buf = io.BytesIO()
    np.save(buf, vectors)
    atomic_write_bytes(Path(out), buf.getvalue())
    if engine == "ray" and not keep_shards:
        import shutil

        shutil.rmtree(shards, ignore_errors=True)
    click.echo(json.dumps({
        "out": str(out), "shape": list(vectors.shape), "model": model_name, "paths": kept,
        "skipped": [{"path": p, "error": msg} for p, msg in skipped],
    }))
