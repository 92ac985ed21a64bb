"""dinoserve's Gradio app: similar-image search, CLS attention maps and embeddings.

Built from a :class:`dinoserve.Client` (embedded onnxruntime or a Triton server) and an
embedding index::

    from dinoserve import Client
    from dinoserve import app

    demo = app.launch(Client(repo="model_repository"), "photos.index", port=7860)

Safe by default: it binds 127.0.0.1, refuses uploads over ``max_upload_mb``, decodes
uploads with dinoserve's checks (clear messages, no stack traces), and serves no file from
disk except copies of the index images it shows and its own downloads, all in one app
folder (Gradio's ``allowed_paths`` is that folder alone). The image behind a result click
is looked up on the server, never taken from the browser. Nothing launches on import;
``dinoserve app`` is the command.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gradio as gr

__all__ = ["build_app", "launch", "load_index", "DEFAULT_MAX_UPLOAD_MB"]

#: Default upload limit; a photo rarely needs more, and dinoserve.images caps pixels anyway.
DEFAULT_MAX_UPLOAD_MB = 20


def load_index(index: Any):
    """``index`` itself when it is already loaded, else :meth:`EmbeddingIndex.load` of the path."""
    if isinstance(index, (str, os.PathLike)):
        from dinoserve.index import EmbeddingIndex

        return EmbeddingIndex.load(index)
    return index


def build_app(client: Any, index: Any, *, title: str = "dinoserve", workdir: str | os.PathLike | None = None) -> "gr.Blocks":
    """Build (not launch) the app over ``client`` and ``index`` (loaded or a path).

    ``workdir`` is the one folder the app serves files from (copies of the index images it
    shows, embedding downloads); by default a temporary folder removed at exit.
    """
    from dinoserve.app.blocks import build_blocks
    from dinoserve.app.handlers import Handlers

    index = load_index(index)
    owned = None
    if workdir is None:
        # Removed when the app object is collected or the process exits.
        owned = tempfile.TemporaryDirectory(prefix="dinoserve-app-")
        workdir = owned.name
    handlers = Handlers(client, index, client.info, workdir)
    demo = build_blocks(handlers, title=title)
    demo.dinoserve_handlers = handlers  # for tests and callers who want the plain functions
    demo.dinoserve_workdir = owned
    return demo


def launch(
    client: Any,
    index: Any,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    title: str = "dinoserve",
    **launch_kwargs: Any,
) -> "gr.Blocks":
    """Build the app and serve it on ``host:port``; returns the launched ``gr.Blocks``.

    Blocks the calling thread unless ``prevent_thread_lock=True`` is passed (tests do).
    The URL is ``demo.local_url``; stop it with ``demo.close()``.
    """
    import gradio as gr

    index = load_index(index)
    demo = build_app(client, index, title=title)
    theme = gr.themes.Default(
        # System fonts: the default theme would fetch Google Fonts, and the app must work offline.
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"],
    )
    demo.queue(default_concurrency_limit=2)
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            max_file_size=int(max_upload_mb * 1024 * 1024),
            allowed_paths=[str(demo.dinoserve_handlers.workdir)],
            share=False,
            show_error=False,  # our gr.Error messages still show; anything else shows no stack trace
            ssr_mode=False,
            mcp_server=False,
            enable_monitoring=False,
            theme=theme,
            **launch_kwargs,
        )
    except OSError as e:  # the port is taken, or the address cannot be bound
        from dinoserve.errors import ServerError

        raise ServerError(f"cannot serve the app on {host}:{port}: {e}; choose a free port with --port") from None
    return demo
