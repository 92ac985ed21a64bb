"""`dinoserve index build|update|info`: a nearest-neighbour index of a folder or a file list."""

from __future__ import annotations

import json

import click

from dinoserve.commands._client_options import client_options, make_client
from dinoserve.commands._ray_options import engine_options, ray_options

KINDS = ("flat", "ivfflat", "ivfsq", "hnsw", "ivfpq", "auto")


@click.group("index")
def index() -> None:
    """Build, update and inspect an embedding index (faiss + item table, atomic on disk)."""


def _echo_report(report) -> None:
    for _, err in report.skipped:
        click.echo(f"skipped {err}", err=True)  # each message starts with its path
    click.echo(json.dumps(report.as_dict()))


@index.command("build")
@click.argument("source", type=click.Path(exists=True))
@click.option("--out", "-o", required=True, type=click.Path(), help="Index directory to create or replace (e.g. photos.index).")
@click.option("--kind", type=click.Choice(KINDS), default=None,
              help="flat: exact inner product; ivfflat / ivfsq / hnsw / ivfpq: approximate, for large collections "
                   "(recall is measured on held-out queries); auto: flat below 100k images, ivfflat to 4M, ivfpq "
                   "from there [default: flat, auto with --recall or --engine ray].")
@click.option("--recall", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="recall@10 target: an approximate index's search parameter (nprobe, efSearch) is swept to the "
                   "fastest value that reaches it on held-out queries; if none does, the best found is reported "
                   "and nothing is written.")
@click.option("--split", "splits", multiple=True, help="With a CSV list: keep only rows of this split (repeatable).")
@click.option("--root", type=click.Path(file_okay=False), default=None, help="With a CSV list: folder relative paths start from.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@client_options
@engine_options
def build(source, out, kind, recall, splits, root, no_progress, url, repo, model, batch_size, timeout, concurrency,
          engine, ray_address, actors, actor_cpus, shard_size, shards_dir, keep_shards):
    """Embed every image under SOURCE (a folder, recursive, or a CSV with a 'path' column) into an index.

    Unreadable or corrupt images are skipped and listed. An existing index at --out is
    replaced only once the new one is complete.

    \b
    Example:
      dinoserve index build photos/ --out photos.index
      dinoserve index build list.csv --split knn_train --out bank.index --url grpc://127.0.0.1:8001
      dinoserve index build photos/ --out photos.index --engine ray --actors 4
      dinoserve index build big/ --out big.index --kind ivfflat --recall 0.95
    """
    if engine == "ray":
        from dinoserve.ray_engine import build_index_ray

        options = ray_options(url, repo, model, batch_size, timeout, ray_address, actors, actor_cpus, shard_size,
                              not no_progress)
        report = build_index_ray(source, out, options, kind=kind or "auto", splits=list(splits) or None, root=root,
                                 shards_dir=shards_dir, keep_shards=keep_shards, recall=recall)
        _echo_report(report)
        return
    from dinoserve.index import build_index

    kind = kind or ("auto" if recall is not None else "flat")

    with make_client(url, repo, model, batch_size, timeout, concurrency) as client:
        report = build_index(source, out, client, kind=kind, splits=list(splits) or None, root=root,
                             progress=not no_progress, recall=recall)
    _echo_report(report)


@index.command("update")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@client_options
def update(path, no_progress, url, repo, model, batch_size, timeout, concurrency):
    """Embed new and changed images of the index's source and drop removed ones.

    The model defaults to the one that built the index.

    \b
    Example:
      dinoserve index update photos.index
    """
    from dinoserve.index import EmbeddingIndex, update_index

    model = model or EmbeddingIndex.load(path).model_name
    with make_client(url, repo, model, batch_size, timeout, concurrency) as client:
        report = update_index(path, client, progress=not no_progress)
    _echo_report(report)


@index.command("info")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def info(path):
    """Print an index's metadata (model, preprocessing, kind, counts, source) as JSON."""
    from dinoserve.index import EmbeddingIndex

    idx = EmbeddingIndex.load(path, mmap=True)
    click.echo(json.dumps(idx.meta, indent=2, sort_keys=True))
