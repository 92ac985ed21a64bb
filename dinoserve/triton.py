"""Find and run a real Triton Inference Server on a dinoserve model repository.

Two kinds of ``tritonserver`` are supported:

- NVIDIA's full server (e.g. in the ``nvcr.io/nvidia/tritonserver`` container, on PATH)
  with an onnxruntime backend: the repository is served as it is.
- The server bundled in the ``nvidia-pytriton`` wheel: it has only the Python backend, so it
  serves a folder that :mod:`dinoserve.triton_python_backend` prepares outside the user's
  repository, where each ONNX model runs on a Python-backend runner with the same name,
  inputs and outputs.

:class:`TritonServer` starts either on 127.0.0.1, waits until every model is ready, and
stops it cleanly. The server runs in its own process group and gets SIGTERM if this process
dies (even by ``kill -9``); when it stops or crashes, whatever it left (Python-backend runner
processes, their ``/dev/shm`` regions, the serving folder) is removed
(:mod:`dinoserve.triton_process`). :meth:`TritonServer.watch` supervises it: a runner that
dies gets its model reloaded through Triton's repository API (readiness is false
meanwhile), and a server that stops by itself ends the watch with the cause, told from its
log (:mod:`dinoserve.triton_log`). It never imports torch.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from dinoserve import triton_log
from dinoserve import triton_process as proc_tree
from dinoserve.errors import ServerError
from dinoserve.ort_session import check_runtime
from dinoserve.repository import choose_models
from dinoserve.triton_python_backend import prepare_bundled_serving

__all__ = ["TritonBinary", "TritonServer", "find_tritonserver", "free_port"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TritonBinary:
    """A ``tritonserver`` executable and what it can serve."""

    path: Path
    backend_dir: Path | None  # its own backends folder, when it has one
    has_onnxruntime: bool  # True: serve ONNX models as they are
    bundled: bool  # True: the nvidia-pytriton wheel's server (Python backend only)


def _pytriton_root() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def find_tritonserver() -> TritonBinary:
    """``tritonserver`` on PATH first (NVIDIA's full server), else the nvidia-pytriton one."""
    on_path = shutil.which("tritonserver")
    if on_path:
        path = Path(on_path).resolve()
        backends = path.parent.parent / "backends"  # /opt/tritonserver/{bin,backends}
        bundled = _pytriton_root() is not None and path == (_pytriton_root() / "bin" / "tritonserver").resolve()
        if not bundled:
            return TritonBinary(path, backends if backends.is_dir() else None,
                                (backends / "onnxruntime").is_dir(), bundled=False)
    root = _pytriton_root()
    if root is not None:
        return TritonBinary(root / "bin" / "tritonserver", root / "backends", False, bundled=True)
    raise ServerError(
        "no tritonserver found: install the serving extra (pip install 'dinoserve[serve]', "
        "which brings nvidia-pytriton's server on Linux x86_64), or run inside NVIDIA's "
        "Triton container where tritonserver is on PATH"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port(host: str, port: int, what: str) -> None:
    """Fail clearly, naming the port and its option, unless ``port`` can be listened on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As a server binds: a port a closed connection still lingers on (TIME_WAIT) is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServerError(
                    f"{what} port {port} on {host} is already in use; choose another with --{what}-port "
                    f"(0 picks a free one), or stop what is using it"
                ) from None
            raise ServerError(f"cannot bind {what} port {port} on {host}: {e.strerror}; check --host and --{what}-port") from None


def _choose_ports(host: str, ports: dict[str, int | None]) -> dict[str, int]:
    """``ports`` with each one given checked (:func:`_check_port`) and each None or 0 set to a
    free port, distinct from the others."""
    for what, port in ports.items():
        if port:
            _check_port(host, port, what)
    chosen = dict(ports)
    taken = {p for p in chosen.values() if p}
    for what in chosen:
        while not chosen[what]:
            candidate = free_port(host)
            if candidate not in taken:
                chosen[what] = candidate
                taken.add(candidate)
    return chosen


# --------------------------------------------------------------------------------------
# Triton's HTTP API
# --------------------------------------------------------------------------------------


def _http_ok(url: str) -> bool:
    """True when a GET of ``url`` answers 200 (readiness endpoints); False for anything else."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _repository_request(http_url: str, model: str, action: str, timeout: float) -> str | None:
    """POST Triton's model-repository ``load``/``unload`` for ``model``; None or the error."""
    url = f"{http_url}/v2/repository/models/{model}/{action}"
    request = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", errors="replace")
        try:
            return json.loads(body).get("error") or body
        except (ValueError, AttributeError):
            return body or str(e)
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))


# --------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------

#: A model whose runner dies this often within RESTART_WINDOW_S is not reloaded again.
MAX_RESTARTS = 3
RESTART_WINDOW_S = 300.0

#: ``notify(event, model, message)``: what :meth:`TritonServer.watch` reports. Events are
#: "runner-died", "unloaded" (the model is not ready now) and "reloaded".
Notify = Callable[[str, str, str], None]


class TritonServer:
    """A running ``tritonserver`` on a model repository, as a context manager.

    Example::

        with TritonServer("model_repository") as server:
            client = Client(server.http_url, model="dino_vits16")

    Args:
        repo: the model repository (as written by ``dinoserve export --onnx``).
        host: address to bind; 127.0.0.1 by default (Triton itself would bind 0.0.0.0).
        http_port, grpc_port, metrics_port: ports; a free one when None or 0 (``dinoserve
            serve`` defaults to Triton's 8000, 8001 and 8002).
        models: model names to serve; all of the repository's by default.
        log_file: where the server's output goes; a file in the serving folder by default.
        startup_timeout: seconds to wait until every model is ready (also per reload).
        binary: a :class:`TritonBinary`; :func:`find_tritonserver` by default.
        intra_op_threads: onnxruntime threads per runner (pip server only; 0 = default).
        device: where each runner's onnxruntime runs (pip server only): ``auto``, ``cpu``,
            ``gpu``, ``cuda`` or ``tensorrt`` (see :mod:`dinoserve.ort_session`); default each
            model's instance kind (GPU instances: ``auto``). :meth:`runner_providers` says
            which provider each model got.
        runtime: what runs each model (pip server only): ``onnxruntime`` or ``openvino``
            (CPU only; see :mod:`dinoserve.openvino_session`).

    The server runs in its own process group, in explicit model-control mode (so a model
    can be reloaded), and gets SIGTERM when the thread that started it is gone with its
    process (set up from the main thread only). :meth:`stop` leaves nothing behind: no
    runner process, no shared-memory region of this server, no serving folder.
    """

    def __init__(
        self,
        repo: str | os.PathLike,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        models: Sequence[str] | None = None,
        log_file: str | os.PathLike | None = None,
        startup_timeout: float = 120.0,
        binary: TritonBinary | None = None,
        intra_op_threads: int = 0,
        device: str | None = None,
        runtime: str = "onnxruntime",
    ):
        self.repo = Path(repo).expanduser().absolute()
        self.host = host
        self._ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.models = list(models) if models is not None else None
        self.log_file = Path(log_file) if log_file else None
        self.startup_timeout = startup_timeout
        self.binary = binary
        self.intra_op_threads = intra_op_threads
        self.device = device
        self.runtime = check_runtime(runtime, device or "auto")
        self.process: subprocess.Popen | None = None
        self.served_models: list[str] = []
        self.log_path: Path | None = None
        self._workdir: Path | None = None
        self._log_handle = None
        self._tracker = proc_tree.RunnerTracker()
        self._restarts: dict[str, list[float]] = {}  # model -> monotonic times of its reloads

    # -- addresses ------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_port(self) -> int:
        """The HTTP port (chosen at :meth:`start` when it was left to the server)."""
        return self._ports["http"]

    @property
    def grpc_port(self) -> int:
        """The gRPC port (chosen at :meth:`start` when it was left to the server)."""
        return self._ports["grpc"]

    @property
    def metrics_port(self) -> int:
        """The metrics port (chosen at :meth:`start` when it was left to the server)."""
        return self._ports["metrics"]

    @property
    def http_url(self) -> str:
        """``http://host:port`` for :class:`~dinoserve.client.Client` and tritonclient."""
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``grpc://host:port`` for :class:`~dinoserve.client.Client` and tritonclient."""
        return f"grpc://{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus metrics page."""
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    # -- lifecycle ------------------------------------------------------------------
    def __enter__(self) -> "TritonServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "TritonServer":
        """Start the server and wait until every model is ready."""
        if self.process is not None:
            raise ServerError("this TritonServer is already running")
        binary = self.binary or find_tritonserver()
        self.served_models = choose_models(self.repo, self.models)
        self._ports = _choose_ports(self.host or "127.0.0.1", self._ports)
        self._workdir = proc_tree.new_workdir()
        try:
            cmd, env = self._command(binary)
            self.log_path = Path(self.log_file or self._workdir / "tritonserver.log")
            self._log_handle = open(self.log_path, "ab")
            log.info("starting %s", " ".join(cmd))
            # Own process group: the runners join it, so they can be found and ended with it.
            # Parent-death signal: a kill -9 of this process still stops the server.
            self.process = subprocess.Popen(cmd, env=env, stdout=self._log_handle, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=proc_tree.parent_death_signal())
            self._wait_ready()
            self._tracker.track(self.process.pid)
        except BaseException:
            self.stop()
            raise
        return self

    def _command(self, binary: TritonBinary) -> tuple[list[str], dict[str, str]]:
        addr = self.host or "127.0.0.1"
        common = [
            f"--http-address={addr}", f"--grpc-address={addr}", f"--metrics-address={addr}",
            f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}", "--exit-timeout-secs=10",
            "--log-verbose=0", "--allow-metrics=true",
            # Explicit control: the served models load at start, and one whose runner died
            # can be reloaded through the repository API (see watch()).
            "--model-control-mode=explicit", *(f"--load-model={m}" for m in self.served_models),
        ]
        if binary.has_onnxruntime:
            cmd = [str(binary.path), f"--model-repository={self.repo}", *common]
            if binary.backend_dir is not None:
                cmd.append(f"--backend-directory={binary.backend_dir}")
            return cmd, dict(os.environ)
        if not binary.bundled:
            raise ServerError(
                f"{binary.path} has no onnxruntime backend and is not nvidia-pytriton's server; "
                f"install the onnxruntime backend or use the nvidia-pytriton wheel"
            )
        serving, backends, env = prepare_bundled_serving(
            binary.path.parent.parent, self._workdir, self.repo, self.served_models,
            intra_op_threads=self.intra_op_threads, device=self.device, runtime=self.runtime)
        return [str(binary.path), f"--model-repository={serving}", f"--backend-directory={backends}", *common], env

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        pending = list(self.served_models)
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerError(self.failure_report(
                    f"tritonserver {proc_tree.describe_exit(code)} while starting"))
            if pending:
                pending = [m for m in pending if not self._get_ok(f"/v2/models/{m}/ready")]
            if not pending and self._get_ok("/v2/health/ready"):
                return
            if time.monotonic() > deadline:
                raise ServerError(self.failure_report(
                    f"tritonserver was not ready after {self.startup_timeout:.0f} s "
                    f"(models not ready: {', '.join(pending) or 'none'})"
                ))
            time.sleep(0.2)

    def _get_ok(self, path: str) -> bool:
        return _http_ok(self.http_url + path)

    # -- supervision ------------------------------------------------------------------
    def runners(self) -> list[proc_tree.Runner]:
        """The live Python-backend runner processes of this server (one per model instance;
        none for models that Triton's own onnxruntime backend serves)."""
        return [] if self.process is None else self._tracker.live(self.process.pid)

    def check(self, notify: Notify | None = None) -> list[str]:
        """One round of supervision; the models reloaded because their runner had died.

        Triton does not notice a dead Python-backend runner: every request to its model
        fails ("Stub process ... is not healthy") while the server and the model still
        report ready. So the model is unloaded (readiness turns false), loaded again (a new
        runner) and waited for. Raises :class:`ServerError` with the cause when tritonserver
        has stopped, when a reload fails, or when a runner keeps dying
        (``MAX_RESTARTS`` times within ``RESTART_WINDOW_S``).
        """
        if self.process is None:
            raise ServerError("the server is not running")
        code = self.process.poll()
        if code is not None:
            raise ServerError(self.failure_report(self._stopped_headline(code)))
        dead = self._tracker.dead()
        for model, runners in dead.items():
            self._reload(model, runners, notify or (lambda *_: None))
        self._tracker.track(self.process.pid)
        return list(dead)

    def watch(self, notify: Notify | None = None, interval: float = 0.5) -> None:
        """Supervise the server until it stops (see :meth:`check`); never returns normally.

        Raises :class:`ServerError` naming the cause (a signal, an exit code, the server's
        last meaningful lines) when tritonserver stops by itself or a model cannot be reloaded.
        """
        while True:
            self.check(notify)
            time.sleep(interval)

    def _reload(self, model: str, runners: list[proc_tree.Runner], notify: Notify) -> None:
        """Unload and load ``model`` again after its ``runners`` died, and wait until it is ready."""
        first = runners[0]
        cause = f"the runner process of model {model!r} (pid {first.pid}) {proc_tree.why_gone(first.pid)}"
        self._tracker.forget(runners)
        self._count_restart(model, cause)
        notify("runner-died", model, f"{cause}; reloading {model} (not ready until then)")
        for action in ("unload", "load"):
            error = _repository_request(self.http_url, model, action, timeout=self.startup_timeout)
            if error is not None:
                raise ServerError(self.failure_report(f"{cause}, and {action}ing {model} again failed: {error}"))
            if action == "unload":
                notify("unloaded", model, f"{model} unloaded; readiness is false until it is loaded again")
        deadline = time.monotonic() + self.startup_timeout
        while not self._get_ok(f"/v2/models/{model}/ready"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise ServerError(self.failure_report(f"{cause}, and {model} did not become ready again"))
            time.sleep(0.2)
        self._tracker.release(runners)
        self._tracker.track(self.process.pid)
        pids = ", ".join(str(pid) for pid in self._tracker.pids(model)) or "none"
        notify("reloaded", model, f"{model} reloaded and ready again (runner pid {pids})")

    def _count_restart(self, model: str, cause: str) -> None:
        """Record a reload of ``model``; raise instead when it has had :data:`MAX_RESTARTS`
        within :data:`RESTART_WINDOW_S` (a runner that keeps dying is not reloaded forever)."""
        now = time.monotonic()
        recent = [t for t in self._restarts.get(model, []) if now - t < RESTART_WINDOW_S]
        if len(recent) >= MAX_RESTARTS:
            raise ServerError(self.failure_report(
                f"{cause}; it has died {len(recent) + 1} times within {RESTART_WINDOW_S:.0f} s, so it is "
                f"not reloaded again"))
        self._restarts[model] = recent + [now]

    # -- reporting --------------------------------------------------------------------
    def _stopped_headline(self, code: int) -> str:
        headline = f"tritonserver {proc_tree.describe_exit(code)} while serving"
        if code == -signal.SIGKILL:
            headline += " (SIGKILL comes from outside: kill -9, or the kernel's out-of-memory killer; see dmesg)"
        return headline

    def failure_report(self, headline: str) -> str:
        """``headline`` plus the server's last meaningful lines: its errors if it printed
        any, else its last lines; GPU-probing noise and the start-up tables left out."""
        lines = triton_log.failure_lines(self.log_lines())
        shown = "\n  ".join(lines) if lines else "(no output)"
        if self._workdir is not None:  # name the user's repository, not our serving copy
            shown = shown.replace(str(self._workdir / "model_repository"), str(self.repo))
        where = f" ({self.log_file})" if self.log_file else ""
        return f"{headline}. Server output{where}:\n  {shown}"

    def log_lines(self) -> list[str]:
        """The server's output so far."""
        return triton_log.read_log(self.log_path)

    def is_running(self) -> bool:
        """True while the server process runs."""
        return self.process is not None and self.process.poll() is None

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        if self.process is None:
            raise ServerError("the server is not running")
        return self.process.wait()

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` s) and clean up: any
        runner it left behind is killed, and its shared memory and serving folder removed."""
        proc, self.process = self.process, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop in %.0f s; killing it", timeout)
                    proc.kill()
                    proc.wait()
            self._tracker.clean_up_group(proc.pid)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._workdir is not None:  # the serving folder, and the log unless log_file was given
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def status(self) -> dict:
        """Addresses, models, the onnxruntime provider of each runner and the server's pid, for printing."""
        return {"http": self.http_url, "grpc": self.grpc_url, "metrics": self.metrics_url,
                "models": self.served_models, "repository": str(self.repo),
                "providers": self.runner_providers(),
                "pid": self.process.pid if self.process is not None else None}

    def runner_providers(self) -> dict[str, str]:
        """Model -> the onnxruntime provider its runner reported in the server log (latest
        load wins); empty for NVIDIA's own onnxruntime backend, which reports none."""
        return triton_log.runner_providers(self.log_lines())

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"TritonServer({str(self.repo)!r}, {state}, http={self.http_port}, grpc={self.grpc_port})"

    def describe(self) -> str:
        """:meth:`status` as one JSON line."""
        return json.dumps(self.status())
