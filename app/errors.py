"""How the app reports a user's mistake."""

from __future__ import annotations

import contextlib
from typing import Iterator

import gradio as gr

from dinoserve.errors import DinoserveError


def app_error(message: str, title: str = "Cannot do that") -> gr.Error:
    """A ``gr.Error`` for a user mistake: shown in the UI, raised as ``AppError`` by
    gradio_client, and not logged with a traceback on the server (it is not a bug)."""
    return gr.Error(message, title=title, print_exception=False)


@contextlib.contextmanager
def user_errors(title: str = "Cannot do that") -> Iterator[None]:
    """Turn dinoserve's own errors into :func:`app_error`; anything else is a bug and stays."""
    try:
        yield
    except DinoserveError as e:
        raise app_error(str(e), title=title) from None
