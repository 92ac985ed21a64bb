"""The `dinoserve` command line: a click group of verbs, each a thin shell over a library call.

Commands live in ``dinoserve/commands/<verb>.py`` and are imported only when run (or when
``--help`` lists them), so ``dinoserve --help`` never imports torch. Every
:class:`~dinoserve.errors.DinoserveError` becomes a one-line message and exit code 1 here,
in one place; set ``DINOSERVE_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import importlib
import os

import click

from dinoserve import __version__
from dinoserve.errors import DinoserveError

#: verb -> "module:attribute" of its click command.
COMMANDS: dict[str, str] = {
    "app": "dinoserve.commands.app:app",
    "demo": "dinoserve.commands.demo:demo",
    "embed": "dinoserve.commands.embed:embed",
    "eval": "dinoserve.commands.eval:eval_",
    "export": "dinoserve.commands.export:export",
    "index": "dinoserve.commands.index:index",
    "models": "dinoserve.commands.models:models",
    "search": "dinoserve.commands.search:search",
    "serve": "dinoserve.commands.serve:serve",
    "train": "dinoserve.commands.train:train",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use, and which translates our errors."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DinoserveError as e:
            if os.environ.get("DINOSERVE_DEBUG"):
                raise
            raise click.ClickException(str(e)) from e


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dinoserve")
def cli() -> None:
    """DINO image features end to end: train, export to ONNX/Triton, serve, embed, search."""


def main() -> None:
    cli(prog_name="dinoserve")
