"""Options shared by every command that embeds images: where the model runs and how."""

from __future__ import annotations

import functools

import click

from dinoserve.ort_session import DEVICES, RUNTIMES  # constants only: no onnxruntime import


def client_options(fn):
    """Add --url, --repo, --model, --batch-size, --timeout, --concurrency, --device and
    --runtime to a command. --device and --runtime reach :func:`make_client` through the
    click context, so commands need not pass them along."""

    @click.option("--url", envvar="DINOSERVE_URL", default=None,
                  help="Triton server, http://HOST:8000 or grpc://HOST:8001 [env DINOSERVE_URL]; "
                       "without it the model runs in-process (onnxruntime).")
    @click.option("--repo", envvar="DINOSERVE_REPO", default="model_repository", show_default=True,
                  type=click.Path(file_okay=False), help="Triton model repository [env DINOSERVE_REPO].")
    @click.option("--model", "-m", default=None, help="Model name (default: the only model there).")
    @click.option("--batch-size", "-b", default=32, show_default=True, type=click.IntRange(1), help="Images per request.")
    @click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                  help="Seconds per server request.")
    @click.option("--concurrency", default=None, type=click.IntRange(1),
                  help="Requests in flight [default: 4 with --url, 2 in-process].")
    @click.option("--runtime", type=click.Choice(RUNTIMES), default="onnxruntime",
                  show_default=True, help="In-process only: what runs the model (openvino: CPU only).")
    @click.option("--device", type=click.Choice(DEVICES), default="auto",
                  show_default=True, help="In-process only: auto = TensorRT, then CUDA, then the CPU; gpu/cuda/"
                                          "tensorrt fail naming what is missing instead of falling back.")
    @functools.wraps(fn)
    def wrapper(*args, runtime, device, **kwargs):
        click.get_current_context().meta.update({"dinoserve.runtime": runtime, "dinoserve.device": device})
        return fn(*args, **kwargs)

    return wrapper


def in_process_choices() -> dict[str, str]:
    """``{"runtime": ..., "device": ...}`` as --runtime/--device set them for the running
    command (the defaults outside one)."""
    meta = ctx.meta if (ctx := click.get_current_context(silent=True)) is not None else {}
    return {"runtime": meta.get("dinoserve.runtime", "onnxruntime"), "device": meta.get("dinoserve.device", "auto")}


def make_client(url, repo, model, batch_size, timeout, concurrency):
    """The Client the options describe (imported here so --help stays fast)."""
    from dinoserve.client import Client

    return Client(url, model=model, repo=repo, batch_size=batch_size, timeout=timeout, concurrency=concurrency,
                  **in_process_choices())
