"""Find and run a real Triton Inference Server on a dinoserve model repository.

Two kinds of ``tritonserver`` are supported:

- NVIDIA's full server (e.g. in the ``nvcr.io/nvidia/tritonserver`` container, on PATH)
  with an onnxruntime backend: the repository is served as it is.
- The server bundled in the ``nvidia-pytriton`` wheel: it has only the Python backend,
  so a serving folder is prepared outside the user's repository, holding a backend
  directory (the Python backend plus the stub for this interpreter) and, per ONNX model,
  a Python-backend runner (:mod:`dinoserve.triton_runner`) with the same name, inputs
  and outputs that runs the same ``model.onnx`` with onnxruntime.

:class:`TritonServer` starts either on 127.0.0.1 with free ports, waits until every model
is ready, and stops it cleanly. It never imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dinoserve.errors import ModelNotFoundError, ServerError
from dinoserve.repository import (CONFIG_FILENAME, ONNX_FILENAME, list_models, list_versions, python_backend_config,
                                  read_model_config)

__all__ = ["TritonBinary", "TritonServer", "find_tritonserver", "prepare_serving_repository", "free_port"]

log = logging.getLogger(__name__)

RUNNER_TEMPLATE = Path(__file__).with_name("triton_runner.py")


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
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServerError(
                f"{what} port {port} on {host} is already in use ({e.strerror}); pick another "
                f"port (--{what}-port) or stop what is using it"
            ) from None


# --------------------------------------------------------------------------------------
# Serving folder for the pip-bundled server
# --------------------------------------------------------------------------------------


def _stub_path(root: Path) -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version} (looked at {stub})")
    return stub


def prepare_serving_repository(
    repo: str | os.PathLike, target: str | os.PathLike, models: Sequence[str] | None = None,
    *, intra_op_threads: int = 0,
) -> list[str]:
    """Write a Python-backend twin of ``repo`` into ``target`` for the pip-bundled server.

    Each ONNX model (``backend: "onnxruntime"``) gets the same ``config.pbtxt`` with
    ``backend: "python"``, and per version a ``model.py`` runner next to a link to the
    original ``model.onnx``. Other models are linked as they are. ``repo`` is not touched.
    Returns the model names written.
    """
    repo, target = Path(repo).absolute(), Path(target)
    names = _select_models(repo, models)
    for name in names:
        src = repo / name
        config = read_model_config(src)
        if config.backend != "onnxruntime" and config.platform != "onnxruntime_onnx":
            os.symlink(src, target / name)
            continue
        dst = target / name
        dst.mkdir(parents=True)
        text = python_backend_config(src, intra_op_threads=intra_op_threads)
        (dst / CONFIG_FILENAME).write_text(text, encoding="utf-8")
        for version in list_versions(src):
            onnx = src / str(version) / ONNX_FILENAME
            if not onnx.is_file():
                continue  # Triton would reject the version; the latest complete one serves
            (dst / str(version)).mkdir()
            shutil.copyfile(RUNNER_TEMPLATE, dst / str(version) / "model.py")
            os.symlink(onnx, dst / str(version) / ONNX_FILENAME)
    return names


def _select_models(repo: Path, models: Sequence[str] | None) -> list[str]:
    if not repo.is_dir():
        raise ModelNotFoundError(f"model repository {repo} does not exist; export a model into it first")
    available = list_models(repo)
    if models is None:
        if not available:
            raise ModelNotFoundError(
                f"model repository {repo} holds no models (folders with config.pbtxt); "
                f"export one with: dinoserve export --onnx --weights ... --name NAME --repo {repo}"
            )
        return available
    unknown = [m for m in models if m not in available]
    if unknown:
        raise ModelNotFoundError(f"no model {', '.join(map(repr, unknown))} in {repo}; available: {', '.join(available) or 'none'}")
    return list(models)


def _backend_dir(root: Path, target: Path) -> Path:
    """A backend directory with ``python/`` holding the backend and this Python's stub."""
    python = target / "python"
    python.mkdir(parents=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(root / "backends" / "python" / f, python / f)
    shutil.copy2(_stub_path(root), python / "triton_python_backend_stub")
    return target


def _bundled_env(root: Path) -> dict[str, str]:
    """Environment for the pip server: this Python's libpython first (else the stub picks
    the system's, another patch level, and crashes), the wheel's libraries, the venv on PATH."""
    env = dict(os.environ)
    site = root.parent.parent  # <site-packages>/pytriton/tritonserver
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(site / "nvidia_pytriton.libs")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    paths = [p for p in sys.path if p.endswith("site-packages")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


# --------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------

#: Lines a CPU-only machine always prints; never the reason a start failed.
_NOISE = re.compile(r"CudaDriverHelper|NVML|DCGM|cuda|GPU metrics|pinned memory", re.IGNORECASE)
_ERROR_LINE = re.compile(r"^E\d{4} |error|failed|UNAVAILABLE|Traceback|Exception", re.IGNORECASE)


class TritonServer:
    """A running ``tritonserver`` on a model repository, as a context manager.

    Example::

        with TritonServer("model_repository") as server:
            client = Client(server.http_url, model="dino_vits16")

    Args:
        repo: the model repository (as written by ``dinoserve export --onnx``).
        host: address to bind; 127.0.0.1 by default (Triton itself would bind 0.0.0.0).
        http_port, grpc_port, metrics_port: ports; free ones when None.
        models: model names to serve; all of the repository's by default.
        log_file: where the server's output goes; a file in the serving folder by default.
        startup_timeout: seconds to wait until every model is ready.
        binary: a :class:`TritonBinary`; :func:`find_tritonserver` by default.
        intra_op_threads: onnxruntime threads per runner (pip server only; 0 = default).
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
    ):
        self.repo = Path(repo).expanduser().absolute()
        self.host = host
        self._ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.models = list(models) if models is not None else None
        self.log_file = Path(log_file) if log_file else None
        self.startup_timeout = startup_timeout
        self.binary = binary
        self.intra_op_threads = intra_op_threads
        self.process: subprocess.Popen | None = None
        self.served_models: list[str] = []
        self._workdir: Path | None = None
        self._log_handle = None

    # -- addresses ------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_port(self) -> int:
        return self._ports["http"]

    @property
    def grpc_port(self) -> int:
        return self._ports["grpc"]

    @property
    def metrics_port(self) -> int:
        return self._ports["metrics"]

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
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
        self.served_models = _select_models(self.repo, self.models)
        for what, port in self._ports.items():
            if port is None:
                self._ports[what] = free_port(self.host or "127.0.0.1")
            else:
                _check_port(self.host or "127.0.0.1", port, what)
        self._workdir = Path(tempfile.mkdtemp(prefix="dinoserve-triton-"))
        try:
            cmd, env = self._command(binary)
            log_path = self.log_file or self._workdir / "tritonserver.log"
            self.log_path = Path(log_path)
            self._log_handle = open(self.log_path, "ab")
            log.info("starting %s", " ".join(cmd))
            # Own session: stopping the server also reaches its Python stub processes.
            self.process = subprocess.Popen(cmd, env=env, stdout=self._log_handle, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
            self._wait_ready()
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
        ]
        if binary.has_onnxruntime:
            cmd = [str(binary.path), f"--model-repository={self.repo}", *common]
            if self.models is not None:
                cmd += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in self.served_models)]
            if binary.backend_dir is not None:
                cmd.append(f"--backend-directory={binary.backend_dir}")
            return cmd, dict(os.environ)
        if not binary.bundled:
            raise ServerError(
                f"{binary.path} has no onnxruntime backend and is not nvidia-pytriton's server; "
                f"install the onnxruntime backend or use the nvidia-pytriton wheel"
            )
        root = binary.path.parent.parent
        serving = self._workdir / "model_repository"
        serving.mkdir()
        prepare_serving_repository(self.repo, serving, self.served_models, intra_op_threads=self.intra_op_threads)
        backends = _backend_dir(root, self._workdir / "backends")
        cmd = [str(binary.path), f"--model-repository={serving}", f"--backend-directory={backends}", *common]
        return cmd, _bundled_env(root)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        pending = list(self.served_models)
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerError(self.failure_report(f"tritonserver exited with code {code} while starting"))
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
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def failure_report(self, headline: str) -> str:
        """``headline`` plus the server's own error lines (GPU-probing noise left out)."""
        lines = [line for line in self.log_lines() if not _NOISE.search(line)]
        errors = [line for line in lines if _ERROR_LINE.search(line)] or lines[-15:]
        shown = "\n  ".join(errors[-12:]) if errors else "(no output)"
        if self._workdir is not None:  # name the user's repository, not our serving copy
            shown = shown.replace(str(self._workdir / "model_repository"), str(self.repo))
        where = f" ({self.log_file})" if self.log_file else ""
        return f"{headline}. Server output{where}:\n  {shown}"

    def log_lines(self) -> list[str]:
        """The server's output so far."""
        try:
            return Path(self.log_path).read_text(encoding="utf-8", errors="replace").splitlines()
        except (OSError, AttributeError):
            return []

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        if self.process is None:
            raise ServerError("the server is not running")
        return self.process.wait()

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` s) and clean up."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in %.0f s; killing it", timeout)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc is not None:
            self._reap_group(proc.pid)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._workdir is not None:  # the serving folder, and the log unless log_file was given
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    @staticmethod
    def _reap_group(pgid: int) -> None:
        """Python stubs left behind by a crashed server are in its process group: end them."""
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def status(self) -> dict:
        """Addresses and models, for printing."""
        return {"http": self.http_url, "grpc": self.grpc_url, "metrics": self.metrics_url,
                "models": self.served_models, "repository": str(self.repo)}

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"TritonServer({str(self.repo)!r}, {state}, http={self.http_port}, grpc={self.grpc_port})"

    def describe(self) -> str:
        return json.dumps(self.status())
