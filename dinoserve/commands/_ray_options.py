"""Options of the commands that can run on Ray (`embed`, `index build`): which engine, which cluster."""

from __future__ import annotations

import functools

import click

from dinoserve.commands._client_options import in_process_choices

ENGINES = ("inprocess", "ray")


def engine_options(fn):
    """Add --engine, --ray-address, --actors, --actor-cpus, --shard-size, --shards and --keep-shards to a command."""

    @click.option("--engine", type=click.Choice(ENGINES), default="inprocess", show_default=True,
                  help="inprocess: one client in this process; ray: Ray Data, decoding in CPU tasks and "
                       "embedding in an actor pool, with resumable shards (needs the `ray` extra).")
    @click.option("--ray-address", envvar="RAY_ADDRESS", default=None,
                  help="Ray cluster for --engine ray, HOST:6379, ray://HOST:10001 or auto [env RAY_ADDRESS]; "
                       "without it a local Ray is started.")
    @click.option("--actors", default=None, type=click.IntRange(1),
                  help="--engine ray: embedding actors, each with its own model session or Triton client "
                       "[default: half the cluster's CPUs].")
    @click.option("--actor-cpus", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                  help="--engine ray: CPUs each actor reserves (with --url an actor only waits on Triton: 0.25).")
    @click.option("--shard-size", default=1024, show_default=True, type=click.IntRange(1),
                  help="--engine ray: files per shard (the unit written, resumed and retried).")
    @click.option("--shards", "shards_dir", default=None, type=click.Path(file_okay=False),
                  help="--engine ray: folder of the resumable shards [default: OUT.shards].")
    @click.option("--keep-shards", is_flag=True, help="--engine ray: keep the shards once the output is written.")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def ray_options(url, repo, model, batch_size, timeout, ray_address, actors, actor_cpus, shard_size,
                progress: bool = True):
    """The :class:`~dinoserve.ray_engine.RayOptions` the command line describes."""
    from dinoserve.ray_engine import RayOptions

    choices = in_process_choices()
    if choices["device"] not in ("auto", "cpu"):
        raise click.UsageError("--device with --engine ray: the actors choose their own device; leave it at auto")
    return RayOptions(url=url, repo=repo, model=model, batch_size=batch_size, timeout=timeout,
                      address=ray_address, actors=actors, actor_cpus=actor_cpus, shard_size=shard_size,
                      progress=progress, runtime=choices["runtime"])
