"""`dinoserve serve`: a real Triton Inference Server on a model repository."""

from __future__ import annotations

import json
import signal

import click

from dinoserve.ort_session import DEVICES, RUNTIMES  # constants only: no onnxruntime import

PORT = click.IntRange(0, 65535)


@click.command("serve")
@click.option("--repo", envvar="DINOSERVE_REPO", default="model_repository", show_default=True,
              type=click.Path(file_okay=False), help="Triton model repository [env DINOSERVE_REPO].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 exposes the server to the network.")
@click.option("--http-port", default=8000, show_default=True, type=PORT, help="HTTP port; 0 picks a free one.")
@click.option("--grpc-port", default=8001, show_default=True, type=PORT, help="gRPC port; 0 picks a free one.")
@click.option("--metrics-port", default=8002, show_default=True, type=PORT, help="Metrics port; 0 picks a free one.")
@click.option("--model", "-m", "models", multiple=True, help="Serve only this model (repeatable) [default: all].")
@click.option("--log-file", default=None, type=click.Path(dir_okay=False), help="Write the server's output here.")
@click.option("--device", type=click.Choice(DEVICES), default=None,
              help="Where each model's onnxruntime runner runs (pip server): auto = TensorRT, then CUDA, then the "
                   "CPU; gpu/cuda/tensorrt refuse to fall back to the CPU [default: each model's instance kind].")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="onnxruntime", show_default=True,
              help="What runs each model (pip server): openvino is CPU only and was faster for CNNs and int8 "
                   "exports on the CPUs measured (README, Throughput).")
@click.option("--startup-timeout", default=180.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds to wait until every model is ready (also when one is reloaded).")
def serve(repo, host, http_port, grpc_port, metrics_port, models, log_file, device, runtime, startup_timeout):
    """Run tritonserver on REPO until Ctrl-C or SIGTERM.

    Uses `tritonserver` from PATH (NVIDIA's container) or the one in the nvidia-pytriton
    wheel, whose ONNX models run through an onnxruntime Python-backend runner. Prints one
    JSON line with the endpoints once every model is ready.

    While it runs, a model whose runner process dies is reloaded (its readiness is false
    meanwhile); if tritonserver stops by itself, or a model cannot be reloaded, this exits
    with code 1 and the cause. Nothing it started outlives it.

    \b
    Example:
      dinoserve serve --repo model_repository        # HTTP 8000, gRPC 8001, metrics 8002
      dinoserve serve --http-port 0 --grpc-port 0 --metrics-port 0   # free ports
    """
    from dinoserve.triton import TritonServer

    server = TritonServer(repo, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          models=list(models) or None, log_file=log_file, startup_timeout=startup_timeout,
                          device=device, runtime=runtime)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt  # one shutdown path for Ctrl-C and SIGTERM

    def report(event: str, model: str, message: str) -> None:
        click.echo(message, err=True)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server.start()
        click.echo(json.dumps(server.status()))
        click.echo(f"serving {', '.join(server.served_models)}: HTTP {server.http_url}  gRPC {server.grpc_url}  "
                   f"metrics {server.metrics_url}  (Ctrl-C to stop)", err=True)
        for model, provider in server.runner_providers().items():
            click.echo(f"model {model}: onnxruntime runs on {provider}", err=True)
        server.watch(notify=report)  # returns only by raising: the cause of a stop
    except KeyboardInterrupt:
        click.echo("stopping tritonserver ...", err=True)
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
