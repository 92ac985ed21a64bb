"""dinoserve's Gradio app: similar-image search, CLS attention maps and embeddings.

Built from a :class:`dinoserve.Client` (embedded onnxruntime or a Triton server) and an
embedding index::

    from dinoserve import Client
    from dinoserve import app

    demo = app.launch(Client(repo="model_repository"), "photos.index", port=7860)

:func:`serve_app` is the one way the command line (``dinoserve app``, ``dinoserve demo``)
runs it: model/index check, a warning off loopback, the URL, then serving until Ctrl-C or
SIGTERM, after which the app's temporary folder is gone.

Safe by default: it binds 127.0.0.1, refuses uploads over ``max_upload_mb``, decodes
uploads with dinoserve's checks (clear messages, no stack traces), and serves no file from
disk except copies of the index images it shows and its own downloads, all in one app
folder (Gradio's ``allowed_paths`` is that folder alone). The image behind a result click
is looked up on the server, never taken from the browser. Nothing launches on import;
``dinoserve app`` is the command.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import gradio as gr

__all__ = ["build_app", "launch", "serve_app", "load_index", "is_loopback", "check_bindable", "DEFAULT_MAX_UPLOAD_MB"]

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
    workdir: str | os.PathLike | None = None,
    **launch_kwargs: Any,
) -> "gr.Blocks":
    """Build the app and serve it on ``host:port``; returns the launched ``gr.Blocks``.

    Blocks the calling thread unless ``prevent_thread_lock=True`` is passed (tests do).
    The URL is ``demo.local_url``; stop it with ``demo.close()``. ``workdir``: see
    :func:`build_app`. Other keywords go to ``gr.Blocks.launch`` (a public Gradio share
    link only with an explicit ``share=True``).
    """
    import gradio as gr

    index = load_index(index)
    demo = build_app(client, index, title=title, workdir=workdir)
    theme = gr.themes.Default(
        # System fonts: the default theme would fetch Google Fonts, and the app must work offline.
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"],
    )
    demo.queue(default_concurrency_limit=2)
    launch_kwargs.setdefault("share", False)
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            max_file_size=int(max_upload_mb * 1024 * 1024),
            allowed_paths=[str(demo.dinoserve_handlers.workdir)],
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


def is_loopback(host: str) -> bool:
    """Whether ``host`` serves this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bindable(host: str, port: int | None) -> None:
    """Raise :class:`~dinoserve.errors.ServerError`, naming ``--host``/``--port``, unless the
    app could listen on ``host:port`` (checked before Gradio starts its server thread)."""
    from dinoserve.errors import ServerError

    if not port:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServerError(f"cannot serve the app on {host}:{port}: unknown host ({e.strerror}); check --host") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServerError(f"cannot serve the app on {host}:{port}: the port is already in use; "
                                  f"choose a free port with --port") from None
            raise ServerError(f"cannot serve the app on {host}:{port}: {e.strerror}; check --host "
                              f"(127.0.0.1 serves this machine only)") from None


def serve_app(
    client: Any,
    index: Any,
    *,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    title: str = "dinoserve",
    echo: Callable[[str], None] | None = None,
) -> None:
    """Run the app for a person at a terminal until Ctrl-C or SIGTERM; the command line's one way in.

    1. Refuses an index built with another model than ``client``'s
       (:class:`~dinoserve.errors.IndexMismatchError`) before serving, not on the first search.
    2. Warns when ``host`` is not a loopback address: the app has no login.
    3. Serves on ``host:port`` and says where to open it (the address actually bound); no
       Gradio hint about share links, which the command line cannot act on.
    4. Blocks until SIGINT or SIGTERM (when called from the main thread; elsewhere until
       KeyboardInterrupt), then closes the server and removes the app's temporary folder
       (copies of index images, downloads), also when start-up fails.

    ``index`` is a loaded index or its path; ``echo`` prints a message (stderr by default).
    """
    say = echo or (lambda message: print(message, file=sys.stderr, flush=True))
    index = load_index(index)
    index.check_model(client.info)
    if not is_loopback(host):
        say(f"warning: --host {host} makes the app reachable from other machines; it has no login, so "
            "anyone who can reach it can search the index and see its images")
    check_bindable(host, port)
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    workdir = tempfile.mkdtemp(prefix="dinoserve-app-")
    demo = None
    try:
        demo = launch(client, index, host=host, port=port, max_upload_mb=max_upload_mb, title=title,
                      workdir=workdir, prevent_thread_lock=True, quiet=True)
        say(f"dinoserve app: {client.model} on {index.path} ({len(index)} images); "
            f"open {demo.local_url} (Ctrl-C to stop)")
        while not stop.wait(0.5):
            pass
        say("stopping the app ...")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if demo is not None:
            demo.close()
        shutil.rmtree(workdir, ignore_errors=True)
