"""The command line as a whole: every command has --help, and the CLI starts without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from dinoserve.cli import cli


def _all_commands():
    import click

    ctx = click.Context(cli)
    out = [[]]
    for name in cli.list_commands(ctx):
        cmd = cli.get_command(ctx, name)
        out.append([name])
        if isinstance(cmd, click.Group):
            out += [[name, sub] for sub in cmd.list_commands(ctx)]
    return out


@pytest.mark.parametrize("args", _all_commands(), ids=lambda a: " ".join(a) or "dinoserve")
def test_every_command_has_help(args):
    result = CliRunner().invoke(cli, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and "--help" in result.output


def test_version_and_fast_help_without_torch():
    code = "import sys; from dinoserve.cli import cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    out = subprocess.run([sys.executable, "-m", "dinoserve", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "0.1.0" in out.stdout
