"""`dinoserve train`: DINO self-supervised training on a folder or file list of images.

Every option is generated from :class:`dinoserve.training.config.TrainConfig`, so ``--help`` shows
each field's own help text and a new field becomes an option without code here. Options
default to "not given": the preset's value (or, with ``--resume``, the checkpoint's) is
used unless the option is on the command line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing

import click

from dinoserve.training.config import PRESETS, TrainConfig

#: Short aliases for the options used most.
SHORT = {"data": "-d", "out": "-o", "arch": "-a", "epochs": "-e", "batch_size": "-b"}


def _field_option(f: dataclasses.Field) -> typing.Callable:
    """A click option for one config field (default None = keep the preset's value)."""
    tp = typing.get_type_hints(TrainConfig)[f.name]
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    flag = "--" + f.name.replace("_", "-")
    names = [flag] + ([SHORT[f.name]] if f.name in SHORT else [])
    default = f.default if f.default is not dataclasses.MISSING else None
    help_text = f.metadata.get("help", "")
    if default is not None:
        help_text += f" [default: {_show(default)}]"
    kw: dict[str, typing.Any] = {"default": None, "help": help_text}
    if tp is bool:
        names = [f"{flag}/--no-{f.name.replace('_', '-')}"]
        kw["default"] = None
    elif f.name == "split":
        kw.update(multiple=True, type=str, metavar="SPLIT")
    elif tp is tuple:
        kw.update(nargs=2, type=float, metavar="LOW HIGH")
    elif "choices" in f.metadata:
        kw["type"] = click.Choice(f.metadata["choices"])
    else:
        kw["type"] = tp
    return click.option(*names, f.name, **kw)


def _show(value: typing.Any) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def _with_config_options(fn: typing.Callable) -> typing.Callable:
    for f in reversed(dataclasses.fields(TrainConfig)):
        fn = _field_option(f)(fn)
    return fn


@click.command("train", context_settings={"max_content_width": 120})
@click.option("--preset", "-p", type=click.Choice(sorted(PRESETS)), default=None,
              help="Start from a recipe: vit_s16 and resnet50 reproduce the reference; cpu_small trains "
                   "resnet18 at 64/32 px on a few CPU cores in minutes. Options given here override it.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings on stderr (no progress bar or info lines).")
@_with_config_options
def train(preset: str | None, quiet: bool, **options: typing.Any) -> None:
    """Train a DINO student/teacher (timm ResNet or ViT) on your own images.

    Writes OUT/checkpoint.pth (every epoch, and every --save-every steps) and OUT/log.jsonl,
    then prints a JSON summary. The checkpoint loads anywhere --weights is accepted
    (the teacher by default). Under `torchrun --nproc-per-node N` the same command trains
    with DDP.

    \b
    Examples:
      dinoserve train -d photos/ -o runs/photos --preset cpu_small -e 10
      dinoserve train -d openclipart_knn.csv --split knn_train,pool --preset cpu_small \\
          --knn-data openclipart_knn.csv -o runs/clipart
      dinoserve train -o runs/clipart --resume          # continue where it stopped
      torchrun --nproc-per-node 2 -m dinoserve train -d photos/ --preset resnet50 -o runs/r50
    """
    from pathlib import Path

    from dinoserve.errors import DataError
    from dinoserve.training.config import make_config

    given = {k: v for k, v in options.items() if v is not None and v != ()}
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if quiet:
        given.setdefault("progress", False)
    if not given.get("resume"):
        cfg = make_config(preset, **given)
        if cfg.data is not None and not Path(cfg.data).expanduser().exists():  # say so before torch loads
            raise DataError(f"{cfg.data}: no such folder or file list; pass an image folder or a .csv file list")
    from dinoserve.training.engine import train as run
    from dinoserve.training.resume import config_from_checkpoint

    if given.get("resume"):
        # the original command line plus --resume is fine: only options that differ from
        # the run's own are refused, by name
        cfg = config_from_checkpoint(given.pop("out", "runs/dino"), preset=preset, **given)
    result = run(cfg)
    click.echo(json.dumps(result.to_dict()))
