"""The two ways a :class:`~dinoserve.client.Client` runs a model on a uint8 batch.

- :class:`EmbeddedBackend`: onnxruntime in this process, on ``<repo>/<model>/<version>/model.onnx``.
- :class:`TritonBackend`: a Triton server over HTTP or gRPC (tritonclient), one client
  object per thread because tritonclient's HTTP client is not thread-safe, retries with
  exponential backoff for transient failures (connection refused/reset, 502/503/504/429,
  UNAVAILABLE/RESOURCE_EXHAUSTED) and never for anything else.

Both expose ``info`` (a :class:`~dinoserve.model_info.ModelInfo`) and
``infer(batch, outputs) -> {name: array}``. Heavy imports happen inside the backends.
No torch here.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import numpy as np

from dinoserve.contract import INPUT
from dinoserve.cpu import CPU_PROVIDERS, check_int8_model
from dinoserve.errors import (
    ConfigError,
    InferenceError,
    ModelNotFoundError,
    ServerError,
    ServerTimeoutError,
    ServerUnavailableError,
)
from dinoserve.model_info import ModelInfo, from_repository_config, from_triton_json
from dinoserve.openvino_session import OPENVINO_PROVIDER
from dinoserve.ort_session import open_runtime_session, session_provider
from dinoserve.repository import choose_model

log = logging.getLogger(__name__)

#: How a client user picks a model: the CLI option, or the Client argument.
MODEL_OPTION = "--model (model= in Python)"
SERVE_HINT = "start one with `dinoserve serve --repo model_repository`, or leave out --url to run the model in-process"


# --- embedded ---------------------------------------------------------------------------------
class EmbeddedBackend:
    """onnxruntime in-process on a model of a local Triton model repository."""

    def __init__(self, repo: str | Path = "model_repository", model: str | None = None,
                 version: int | str | None = None, providers: Sequence[str] | None = None,
                 device: str = "auto", runtime: str = "onnxruntime"):
        """``device``: ``auto`` (TensorRT, then CUDA, then the CPU, whichever this onnxruntime
        build and machine can run), ``cpu``, ``gpu``, ``cuda`` or ``tensorrt`` (no CPU fallback:
        an error names what is missing); see :func:`dinoserve.ort_session.execution_providers`.
        ``providers``: explicit onnxruntime providers instead. ``runtime``: ``onnxruntime``
        or ``openvino`` (CPU only; see :mod:`dinoserve.openvino_session`)."""
        from dinoserve import repository

        self.repo = Path(repo)
        if not self.repo.is_dir():
            raise ModelNotFoundError(
                f"model repository {str(self.repo)!r} does not exist; export a model into it with "
                f"`dinoserve export ... --repo {self.repo}`, or pass --url to use a Triton server"
            )
        name = choose_model(model, repository.list_models(self.repo), f"model repository {str(self.repo)!r}",
                            option=MODEL_OPTION)
        model_dir = self.repo / name
        cfg = repository.read_model_config(model_dir)
        self.onnx_path = Path(repository.model_onnx_path(self.repo, name, version))
        version = version if version is not None else repository.latest_version(model_dir)
        self.info: ModelInfo = from_repository_config(cfg, version=str(version))
        self.session = open_runtime_session(
            self.onnx_path, runtime, providers=providers, device=device,
            hint=f"re-export it with `dinoserve export ... --repo {self.repo}` (export writes model.onnx atomically)")
        if session_provider(self.session) in CPU_PROVIDERS:
            # CPU int8 kernels (onnxruntime's and OpenVINO's): a u8s8 model gives wrong embeddings without VNNI.
            check_int8_model(name, cfg.card.precision, cfg.card.int8_scheme)
        self.info = dataclasses.replace(self.info, provider=session_provider(self.session))
        self.url = None

    def infer(self, batch: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the model on a uint8 ``[N, 3, H, W]`` batch; the ``outputs`` asked for, by name."""
        results = self.session.run(list(outputs), {INPUT: batch})
        return dict(zip(outputs, results))

    def close(self) -> None:
        """Release the session (or the connections); the backend is unusable afterwards."""
        self.session = None

    def describe(self) -> str:
        """What runs the model and where, in one line."""
        runtime = "OpenVINO" if self.info.provider == OPENVINO_PROVIDER else "onnxruntime"
        return f"{runtime} {self.info.provider} {self.onnx_path}"


# --- triton -----------------------------------------------------------------------------------
def parse_url(url: str) -> tuple[str, str]:
    """``http://host:port`` or ``grpc://host:port`` -> (protocol, 'host:port')."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    scheme = parsed.scheme.lower()
    if scheme not in ("http", "grpc"):
        raise ConfigError(f"server URL {url!r}: use http://HOST:PORT (default 8000) or grpc://HOST:PORT (default 8001)")
    if not parsed.hostname:
        raise ConfigError(f"server URL {url!r} has no host; for example http://127.0.0.1:8000")
    port = parsed.port or (8000 if scheme == "http" else 8001)
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return scheme, f"{host}:{port}"


TRANSIENT_STATUS = {"502", "503", "504", "429", "StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED"}
TIMEOUT_STATUS = {"StatusCode.DEADLINE_EXCEEDED", "408"}


def classify(exc: BaseException) -> str:
    """'transient', 'timeout', 'down' or 'fatal' for an exception a tritonclient call raised."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "down"
    if isinstance(exc, (ConnectionError, OSError)):
        return "transient"  # reset, broken pipe, a socket error mid-request
    if isinstance(exc, InferenceServerException):
        status = str(exc.status())
        if status in TIMEOUT_STATUS:
            return "timeout"
        if status == "StatusCode.UNAVAILABLE" and "connect" in str(exc.message()).lower():
            return "down"
        if status in TRANSIENT_STATUS:
            return "transient"
        if "timeout" in str(exc.message()).lower() or "timed out" in str(exc.message()).lower():
            return "timeout"
    try:
        import gevent

        if isinstance(exc, gevent.Timeout):
            return "timeout"
    except ImportError:  # pragma: no cover - gevent comes with tritonclient[http]
        pass
    return "fatal"


def _message(exc: BaseException) -> str:
    msg = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    return (msg or type(exc).__name__).strip().splitlines()[0]


class TritonBackend:
    """A model on a Triton server, over HTTP or gRPC."""

    def __init__(self, url: str, model: str | None = None, version: int | str | None = None, *,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.25,
                 repo: str | Path | None = None):
        self.url = url
        self.protocol, self.address = parse_url(url)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()
        self._version = "" if version is None else str(version)

        # A server that refuses the connection right now is reported at once (no retries):
        # the usual cause is that none was started.
        listing = self._call(self._repository_index, what="list models", retry_down=False)
        name = choose_model(model, listing, f"Triton server at {url}", option=MODEL_OPTION)
        if not self._call(lambda c: c.is_model_ready(name, self._version, **self._kw),
                          what=f"check model {name}", retry_down=False):
            raise ServerError(f"model {name!r} is on the server at {url} but not ready; check the server log")
        self.info: ModelInfo = self._read_info(name, repo)

    def describe(self) -> str:
        """What runs the model and where, in one line."""
        return f"Triton {self.protocol} {self.address}"

    # -- one tritonclient per thread -------------------------------------------------------
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "http":
                import tritonclient.http as th

                client = th.InferenceServerClient(self.address, connection_timeout=self.timeout,
                                                  network_timeout=self.timeout)
            else:
                import tritonclient.grpc as tg

                client = tg.InferenceServerClient(self.address)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def close(self) -> None:
        """Release the session (or the connections); the backend is unusable afterwards."""
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing a dead connection must not mask the real error
                log.debug("closing a tritonclient failed", exc_info=True)
        self._local = threading.local()

    # -- calls with retries ----------------------------------------------------------------
    @property
    def _kw(self) -> dict:
        # gRPC calls take a per-call deadline; the HTTP client has its network timeout built in.
        return {"client_timeout": self.timeout} if self.protocol == "grpc" else {}

    def _call(self, fn, *, what: str, retry_down: bool = True):
        attempt = 0
        while True:
            try:
                return fn(self._client())
            except BaseException as e:  # noqa: BLE001 - classified below; KeyboardInterrupt passes
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                kind = classify(e)
                retryable = kind == "transient" or (kind == "down" and retry_down)
                if retryable and attempt < self.retries:
                    delay = min(5.0, self.backoff * 2**attempt) * (0.5 + random.random())
                    log.warning("%s at %s failed (%s); retry %d/%d in %.2fs", what, self.url, _message(e),
                                attempt + 1, self.retries, delay)
                    attempt += 1
                    time.sleep(delay)
                    self._reset_thread_client()
                    continue
                raise self._translate(e, kind, what, attempt) from None

    def _reset_thread_client(self) -> None:
        # A connection that failed mid-request may be unusable; the next call opens a new one.
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass

    def _translate(self, e: BaseException, kind: str, what: str, attempts: int) -> Exception:
        tried = f" after {attempts + 1} attempts" if attempts else ""
        msg = _message(e)
        if kind == "down":
            return ServerUnavailableError(f"no Triton server answers at {self.url}{tried} ({msg}); {SERVE_HINT}")
        if kind == "timeout":
            return ServerTimeoutError(
                f"{what} at {self.url} timed out after {self.timeout:g} s; the server may be overloaded "
                "or the batch too large: raise --timeout / timeout= or lower --batch-size"
            )
        if kind == "transient":
            return ServerUnavailableError(f"{what} at {self.url} failed{tried} ({msg}); is the server healthy?")
        if "unknown model" in msg.lower() or "not found" in msg.lower():
            return ModelNotFoundError(f"{what} at {self.url}: {msg}")
        return InferenceError(f"{what} at {self.url} failed: {msg}")

    # -- model discovery -------------------------------------------------------------------
    def _repository_index(self, client) -> list[str]:
        if self.protocol == "http":
            rows = client.get_model_repository_index()
        else:
            rows = client.get_model_repository_index(as_json=True, **self._kw).get("models", [])
        return sorted({r["name"] for r in rows if r.get("state", "READY") == "READY"})

    def _read_info(self, name: str, repo: str | Path | None) -> ModelInfo:
        if self.protocol == "http":
            config = self._call(lambda c: c.get_model_config(name, self._version), what=f"read config of {name}")
        else:
            config = self._call(lambda c: c.get_model_config(name, self._version, as_json=True, **self._kw),
                                what=f"read config of {name}")
        try:
            return from_triton_json(config, version=self._version)
        except ServerError:
            raise
        except Exception:
            # The server's copy lacks our parameters (e.g. a hand-written config): fall back to
            # the local repository's config of the same model when there is one.
            if repo is not None and (Path(repo) / name / "config.pbtxt").is_file():
                from dinoserve import repository

                log.info("model %s: reading parameters from the local repository %s", name, repo)
                return from_repository_config(repository.read_model_config(Path(repo) / name), self._version)
            raise

    # -- inference ---------------------------------------------------------------------------
    def infer(self, batch: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the model on a uint8 ``[N, 3, H, W]`` batch; the ``outputs`` asked for, by name."""
        name = self.info.name
        result = self._call(lambda c: self._infer_once(c, batch, outputs), what=f"inference on {name}")
        for out, arr in result.items():
            if arr is None or arr.shape[:1] != batch.shape[:1]:
                got = None if arr is None else tuple(arr.shape)
                raise InferenceError(
                    f"server at {self.url} returned output {out!r} of shape {got} for a batch of "
                    f"{len(batch)}; a Python-backend server needs numpy<2 (empty outputs otherwise)"
                )
        return result

    def _infer_once(self, client, batch: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        if self.protocol == "http":
            import tritonclient.http as tc

            inp = tc.InferInput(INPUT, list(batch.shape), "UINT8")
            inp.set_data_from_numpy(batch, binary_data=True)
            req = [tc.InferRequestedOutput(o, binary_data=True) for o in outputs]
            res = client.infer(self.info.name, [inp], model_version=self._version, outputs=req)
        else:
            import tritonclient.grpc as tc

            inp = tc.InferInput(INPUT, list(batch.shape), "UINT8")
            inp.set_data_from_numpy(batch)
            req = [tc.InferRequestedOutput(o) for o in outputs]
            res = client.infer(self.info.name, [inp], model_version=self._version, outputs=req,
                               client_timeout=self.timeout)
        return {o: res.as_numpy(o) for o in outputs}
