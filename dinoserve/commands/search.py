"""`dinoserve search`: the nearest indexed images of query images."""

from __future__ import annotations

import json

import click

from dinoserve.commands._client_options import client_options, make_client


@click.command("search")
@click.argument("images", nargs=-1, required=True)
@click.option("--index", "index_path", required=True, type=click.Path(exists=True, file_okay=False),
              help="Index directory made by `dinoserve index build`.")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1), help="Neighbours per query.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per query instead of a table.")
@client_options
def search(images, index_path, k, as_json, url, repo, model, batch_size, timeout, concurrency):
    """Find the K most similar indexed images for each query IMAGE (cosine similarity).

    An IMAGE that is a folder stands for every image under it. All queries are embedded in
    batches and searched together (one matrix product per block of the index for an exact
    index), so many queries cost far less than one call each.

    The model defaults to the one that built the index; another model is refused.

    \b
    Example:
      dinoserve search query.jpg --index photos.index -k 5
      dinoserve search queries/ --index photos.index --json > hits.jsonl
    """
    from pathlib import Path

    from dinoserve.images import walk_images
    from dinoserve.index import EmbeddingIndex

    queries: list[str] = []
    for image in images:
        if Path(image).is_dir():
            found = [str(p) for p in walk_images(Path(image))]
            if not found:
                raise click.BadParameter(f"{image}: a folder with no images in it", param_hint="IMAGES")
            queries += found
        else:
            queries.append(image)
    idx = EmbeddingIndex.load(index_path)
    with make_client(url, repo, model or idx.model_name, batch_size, timeout, concurrency) as client:
        results = client.search(queries, idx, k=k)
    for query, hits in zip(queries, results):
        if as_json:
            click.echo(json.dumps({"query": query, "hits": [
                {"rank": h.rank, "score": round(h.score, 6), "path": h.path} for h in hits]}))
        else:
            click.echo(query)
            for h in hits:
                click.echo(f"  {h.rank:>3}  {h.score:.4f}  {h.path}")
