"""`dinoserve app`: the Gradio app (similar images, attention maps, embeddings) on an index."""

from __future__ import annotations

import click

from dinoserve.commands._client_options import client_options, make_client


@click.command("app")
@click.option("--index", "index_path", required=True, type=click.Path(exists=True, file_okay=False),
              help="Index directory made by `dinoserve index build`; its images are the only files served.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. The default serves this machine only; 0.0.0.0 opens it to the network.")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(1, 65535), help="Port to bind.")
@click.option("--max-upload-mb", default=20.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest upload accepted, in MiB.")
@click.option("--title", default="dinoserve", show_default=True, help="Page title.")
@client_options
def app(index_path, host, port, max_upload_mb, title, url, repo, model, batch_size, timeout, concurrency):
    """Open a web app to search INDEX by image, see CLS attention maps and download embeddings.

    The model defaults to the one that built the index. API endpoints /search, /attention
    and /embed can be called with gradio_client. Stop with Ctrl-C or SIGTERM; the app's
    temporary folder goes with it.

    \b
    Example:
      dinoserve app --index photos.index --repo model_repository
    """
    from dinoserve.index import EmbeddingIndex

    from dinoserve.app import serve_app

    index = EmbeddingIndex.load(index_path)
    with make_client(url, repo, model or index.model_name, batch_size, timeout, concurrency) as client:
        serve_app(client, index, host=host, port=port, max_upload_mb=max_upload_mb, title=title,
                  echo=lambda message: click.echo(message, err=True))
