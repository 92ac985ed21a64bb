"""A real tritonserver on exported models: readiness, HTTP and gRPC parity with PyTorch,
dynamic batching, metrics, `dinoserve serve`, failures with the server's own errors, and
faults: a SIGKILLed runner is reloaded (or `serve` exits with the cause), and nothing that
`serve` started (runner processes, /dev/shm regions) outlives tritonserver or `serve`."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmarks.synthetic import build_tiny_backbone

from dinoserve.errors import ModelNotFoundError, ServerError
from dinoserve.export import sample_images
from dinoserve.images import normalize, preprocess_batch
from dinoserve.models import forward_with_attention
from dinoserve.repository import read_model_config
from dinoserve.triton import TritonServer, find_tritonserver
from dinoserve.triton_process import SHM_PREFIX, group_members, runner_of
from dinoserve.triton_python_backend import prepare_serving_repository

pytestmark = pytest.mark.triton

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")


def images_at(n: int, h: int, w: int, seed: int = 5) -> np.ndarray:
    big, _, _ = preprocess_batch(sample_images(n, seed=seed), max(h, w))
    return np.ascontiguousarray(big[:, :, :h, :w])


def pytorch_outputs(name: str, images: np.ndarray) -> dict[str, np.ndarray]:
    model = build_tiny_backbone(name)
    x = torch.from_numpy(normalize(images))
    if name == "vit_tiny":
        f, a = forward_with_attention(model, x)
        return {"embedding": f.numpy(), "attention": a.numpy()}
    with torch.no_grad():
        return {"embedding": model(x).numpy()}


def infer(server: TritonServer, protocol: str, model: str, images: np.ndarray, outputs: list[str]) -> dict:
    lib = tritonclient_http if protocol == "http" else tritonclient_grpc
    url = server.http_url if protocol == "http" else server.grpc_url
    client = lib.InferenceServerClient(url.split("://", 1)[1])
    try:
        inp = lib.InferInput("images", list(images.shape), "UINT8")
        inp.set_data_from_numpy(images)
        result = client.infer(model, [inp], outputs=[lib.InferRequestedOutput(o) for o in outputs])
        return {o: result.as_numpy(o) for o in outputs}
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("name,batch,size", [
    ("vit_tiny", 1, (32, 32)), ("vit_tiny", 7, (32, 32)), ("vit_tiny", 7, (48, 64)),
    ("resnet_tiny", 1, (64, 64)), ("resnet_tiny", 7, (64, 64)),
])
def test_served_outputs_equal_pytorch(triton_server, protocol, name, batch, size):
    images = images_at(batch, *size)
    ref = pytorch_outputs(name, images)
    got = infer(triton_server, protocol, name, images, list(ref))
    for key, r in ref.items():
        g = got[key]
        assert g is not None and g.dtype == np.float32 and g.shape == r.shape, key  # not empty (numpy 2 trap)
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=0, err_msg=key)
    if name == "vit_tiny":
        assert got["attention"].shape == (batch, 3, size[0] // 16, size[1] // 16)
        assert np.all(got["attention"] >= 0) and np.all(got["attention"].sum(axis=(2, 3)) <= 1 + 1e-5)


def test_models_ready_with_the_exported_signature(triton_server, tiny_repo):
    client = tritonclient_http.InferenceServerClient(triton_server.http_url.split("://", 1)[1])
    try:
        assert client.is_server_ready()
        for name in ("vit_tiny", "resnet_tiny"):
            assert client.is_model_ready(name)
            meta = client.get_model_metadata(name)
            config = read_model_config(tiny_repo / name)
            assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
                (t.name, "UINT8", [-1, *t.dims]) for t in config.inputs]
            assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
                (t.name, "FP32", [-1, *t.dims]) for t in config.outputs]
            served = client.get_model_config(name)
            assert served["max_batch_size"] == config.max_batch_size
            assert "dynamic_batching" in served
            assert served["parameters"]["arch"]["string_value"] == config.card.arch
    finally:
        client.close()


def _metric(text: str, metric: str, model: str) -> float:
    m = re.search(rf'^{metric}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.MULTILINE)
    assert m, f"{metric} for {model} not in metrics"
    return float(m.group(1))


def test_concurrent_requests_are_answered_and_counted(triton_server):
    """16 concurrent requests of two image sizes (dynamic batching may merge them; the
    runner groups them by size) each get their own rows."""
    with urllib.request.urlopen(triton_server.metrics_url) as r:
        before = r.read().decode()
    sets = [images_at(1 + i % 3, *((32, 32) if i % 2 else (48, 64)), seed=10 + i) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:  # one HTTP client per request: they are not thread-safe
        results = list(pool.map(lambda im: infer(triton_server, "http", "vit_tiny", im, ["embedding"]), sets))
    model = build_tiny_backbone("vit_tiny")
    for images, got in zip(sets, results):
        with torch.no_grad():
            ref = model(torch.from_numpy(normalize(images))).numpy()
        np.testing.assert_allclose(got["embedding"], ref, atol=1e-4, rtol=0)
    with urllib.request.urlopen(triton_server.metrics_url) as r:
        after = r.read().decode()
    sent = sum(len(s) for s in sets)
    counted = _metric(after, "nv_inference_count", "vit_tiny") - _metric(before, "nv_inference_count", "vit_tiny")
    requests = (_metric(after, "nv_inference_request_success", "vit_tiny")
                - _metric(before, "nv_inference_request_success", "vit_tiny"))
    executions = (_metric(after, "nv_inference_exec_count", "vit_tiny")
                  - _metric(before, "nv_inference_exec_count", "vit_tiny"))
    assert counted == sent and requests == 16
    assert 1 <= executions <= 16  # fewer executions than requests when the batcher merged some


def test_serving_folder_is_outside_the_repository(tiny_repo, tmp_path):
    from dinoserve.pbtxt import parse_pbtxt

    before = sorted(str(p) for p in tiny_repo.rglob("*"))
    names = prepare_serving_repository(tiny_repo, tmp_path)
    assert names == ["resnet_tiny", "vit_tiny"]
    assert sorted(str(p) for p in tiny_repo.rglob("*")) == before
    raw = parse_pbtxt((tmp_path / "vit_tiny" / "config.pbtxt").read_text())
    original = parse_pbtxt((tiny_repo / "vit_tiny" / "config.pbtxt").read_text())
    assert raw["backend"] == "python"
    for key in ("name", "max_batch_size", "input", "output", "dynamic_batching"):
        assert raw[key] == original[key], key
    link = tmp_path / "vit_tiny" / "1" / "model.onnx"
    assert link.is_symlink() and link.resolve() == (tiny_repo / "vit_tiny" / "1" / "model.onnx").resolve()
    assert (tmp_path / "vit_tiny" / "1" / "model.py").is_file()


# --- failures -------------------------------------------------------------------------------


def test_port_in_use_is_a_clear_error(tiny_repo):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServerError, match=f"http port {port} .* already in use.*--http-port .0 picks a free one"):
            TritonServer(tiny_repo, http_port=port).start()


def test_cli_serve_uses_tritons_standard_ports_and_names_a_taken_one(tiny_repo):
    from click.testing import CliRunner

    from dinoserve.cli import cli

    r = CliRunner().invoke(cli, ["serve", "--help"])
    assert r.exit_code == 0
    for option, port in (("--http-port", 8000), ("--grpc-port", 8001), ("--metrics-port", 8002)):
        assert re.search(rf"{option} [^[]*\[default: {port}[;\]]", " ".join(r.output.split())), option
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = CliRunner().invoke(cli, ["serve", "--repo", str(tiny_repo), "--http-port", "0",
                                     "--grpc-port", str(port), "--metrics-port", "0"])
    assert r.exit_code == 1, r.output
    assert f"grpc port {port} on 127.0.0.1 is already in use" in r.output and "--grpc-port" in r.output


def test_unknown_model_and_empty_repository(tiny_repo, tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model 'nope'.*available: resnet_tiny, vit_tiny"):
        TritonServer(tiny_repo, models=["nope"]).start()
    with pytest.raises(ModelNotFoundError, match="has no models; export one with `dinoserve export"):
        TritonServer(tmp_path).start()


def test_model_that_fails_to_load_reports_server_errors(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "resnet_tiny", repo / "broken")
    config = (repo / "broken" / "config.pbtxt").read_text().replace('name: "resnet_tiny"', 'name: "broken"')
    (repo / "broken" / "config.pbtxt").write_text(config)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    server = TritonServer(repo, startup_timeout=60)
    with pytest.raises(ServerError) as err:
        server.start()
    message = str(err.value)
    assert "broken" in message and "exited" in message
    assert re.search(r"failed to load|INVALID_PROTOBUF|Protobuf|onnx", message, re.IGNORECASE), message
    assert not server.is_running()


# --- the CLI --------------------------------------------------------------------------------


def test_cli_serve_prints_endpoints_and_stops_on_sigterm(tiny_repo):
    find_tritonserver()
    env = dict(os.environ)
    script = [sys.executable, "-c", "from dinoserve.cli import main; main()"]
    proc = subprocess.Popen([*script, "serve", "--repo", str(tiny_repo), "--model", "resnet_tiny", *FREE_PORTS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        status = json.loads(line)
        assert status["models"] == ["resnet_tiny"] and status["http"].startswith("http://127.0.0.1:")
        with urllib.request.urlopen(status["http"] + "/v2/models/resnet_tiny/ready") as r:
            assert r.status == 200
        images = images_at(2, 64, 64)
        client = tritonclient_grpc.InferenceServerClient(status["grpc"].split("://", 1)[1])
        inp = tritonclient_grpc.InferInput("images", list(images.shape), "UINT8")
        inp.set_data_from_numpy(images)
        got = client.infer("resnet_tiny", [inp]).as_numpy("embedding")
        client.close()
        np.testing.assert_allclose(got, pytorch_outputs("resnet_tiny", images)["embedding"], atol=1e-4, rtol=0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "stopping" in proc.stderr.read()
        with pytest.raises(OSError):  # the server is gone too
            urllib.request.urlopen(status["http"] + "/v2/health/live", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_missing_repository_exit_1(tmp_path):
    from click.testing import CliRunner

    from dinoserve.cli import cli

    result = CliRunner().invoke(cli, ["serve", "--repo", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "does not exist" in result.output


# --- faults: a runner or tritonserver killed ---------------------------------------------------
#: Tests run in parallel: never Triton's standard ports.
FREE_PORTS = ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]


def _alive(pid: int) -> bool:
    """Read /proc directly (not through the code under test): a zombie has died."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _until(condition, what: str, limit: float = 60.0) -> None:
    """Wait for ``condition()`` (a bound on waiting, not a claim about speed)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for: {what}"
        time.sleep(0.1)


def _runners(server_pid: int):
    return [r for r in (runner_of(i) for i in group_members(server_pid) if i.alive) if r is not None]


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class Serve:
    """`dinoserve serve` as a subprocess: its status line, and its stderr read line by line."""

    def __init__(self, repo, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dinoserve", "serve", "--repo", str(repo), *FREE_PORTS, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            pytest.fail(f"serve did not start: {self.output()}")
        self.status = json.loads(line)
        self.pid = self.status["pid"]  # tritonserver's, which is also its process group

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)

    def output(self) -> str:
        return "".join(self.stderr)

    def wait_for_line(self, pattern: str, limit: float = 120.0) -> str:
        deadline = time.monotonic() + limit
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"serve never printed /{pattern}/; it printed:\n{self.output()}")
            if re.search(pattern, line):
                return line

    def infer(self, images: np.ndarray) -> np.ndarray:
        client = tritonclient_grpc.InferenceServerClient(self.status["grpc"].split("://", 1)[1])
        try:
            inp = tritonclient_grpc.InferInput("images", list(images.shape), "UINT8")
            inp.set_data_from_numpy(images)
            return client.infer("resnet_tiny", [inp]).as_numpy("embedding")
        finally:
            client.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for runner in _runners(self.pid):  # whatever a failed test left
            os.kill(runner.pid, signal.SIGKILL)


@pytest.fixture
def serve_resnet(tiny_repo):
    server = Serve(tiny_repo, "--model", "resnet_tiny")
    yield server
    server.close()


def test_killed_runner_is_reloaded_and_not_ready_meanwhile(tiny_repo):
    """The fault: after a SIGKILL of the runner, Triton fails every request while it still
    reports ready. check() reloads the model, with readiness false until it is back."""
    images = images_at(2, 64, 64)
    expected = pytorch_outputs("resnet_tiny", images)["embedding"]
    with TritonServer(tiny_repo, models=["resnet_tiny"]) as server:
        [runner] = server.runners()
        assert runner.model == "resnet_tiny" and runner.shm_region.startswith(SHM_PREFIX)
        os.kill(runner.pid, signal.SIGKILL)
        _until(lambda: not _alive(runner.pid), "the runner to die")
        with pytest.raises(tritonclient_http.InferenceServerException):
            infer(server, "http", "resnet_tiny", images, ["embedding"])
        seen: dict[str, object] = {}

        def notify(event: str, model: str, message: str) -> None:
            seen.setdefault("events", []).append(event)
            if event == "runner-died":
                seen["message"] = message
            if event == "unloaded":  # between unload and load: nobody may think it is ready
                seen["ready"] = (_status(server.http_url + "/v2/health/ready"),
                                 _status(server.http_url + "/v2/models/resnet_tiny/ready"))

        assert server.check(notify) == ["resnet_tiny"]
        assert seen["events"] == ["runner-died", "unloaded", "reloaded"]
        assert f"pid {runner.pid}" in seen["message"] and "killed by SIGKILL" in seen["message"]
        assert seen["ready"] == (400, 400)
        assert _status(server.http_url + "/v2/health/ready") == 200
        [new] = server.runners()
        assert new.pid != runner.pid and _alive(new.pid)
        assert not Path("/dev/shm", runner.shm_region).exists()  # the dead runner's region is gone too
        got = infer(server, "http", "resnet_tiny", images, ["embedding"])["embedding"]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        assert server.check() == []  # nothing more to do


def test_cli_serve_reloads_a_killed_runner(serve_resnet):
    images = images_at(2, 64, 64)
    expected = pytorch_outputs("resnet_tiny", images)["embedding"]
    [runner] = _runners(serve_resnet.pid)
    os.kill(runner.pid, signal.SIGKILL)
    died = serve_resnet.wait_for_line(r"runner process of model 'resnet_tiny'")
    assert f"pid {runner.pid}" in died and "SIGKILL" in died
    serve_resnet.wait_for_line(r"resnet_tiny reloaded and ready again")
    assert serve_resnet.proc.poll() is None
    np.testing.assert_allclose(serve_resnet.infer(images), expected, atol=1e-4, rtol=0)
    assert [r.pid for r in _runners(serve_resnet.pid)] != [runner.pid]


def test_cli_serve_exits_with_the_cause_when_a_runner_cannot_be_reloaded(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "resnet_tiny", repo / "resnet_tiny")
    serve = Serve(repo)
    try:
        [runner] = _runners(serve.pid)
        (repo / "resnet_tiny" / "1" / "model.onnx").write_bytes(b"damaged after start")
        os.kill(runner.pid, signal.SIGKILL)
        assert serve.proc.wait(timeout=120) == 1
        _until(lambda: "Error:" in serve.output(), "the message")
        out = serve.output()
        assert f"runner process of model 'resnet_tiny' (pid {runner.pid}) was killed by SIGKILL" in out
        assert "loading resnet_tiny again failed" in out and "Traceback" not in out
        _until(lambda: not _alive(serve.pid), "tritonserver to stop")
    finally:
        serve.close()


def test_cli_serve_reports_a_killed_tritonserver_and_leaves_no_runner_or_shm(serve_resnet):
    """A runner that does not exit by itself (here: stopped, so SIGTERM stays pending, as
    the issue saw it ignored) must still go, with its /dev/shm region, when tritonserver
    is SIGKILLed; and serve says why it stopped instead of Triton's option table."""
    runners = _runners(serve_resnet.pid)
    assert runners
    regions = [Path("/dev/shm", r.shm_region) for r in runners]
    assert all(p.exists() for p in regions)
    for r in runners:
        os.kill(r.pid, signal.SIGSTOP)
    os.kill(serve_resnet.pid, signal.SIGKILL)
    assert serve_resnet.proc.wait(timeout=120) == 1
    _until(lambda: not any(_alive(r.pid) for r in runners), "the runners to be gone")
    _until(lambda: not any(p.exists() for p in regions), "their /dev/shm regions to be gone")
    _until(lambda: "Error:" in serve_resnet.output(), "the message")
    out = serve_resnet.output()
    assert "tritonserver was killed by SIGKILL (exit code -9)" in out
    assert "model_control_mode" not in out and "+----" not in out  # not the option table
    assert "Traceback" not in out


@pytest.mark.parametrize("also_kill_tritonserver", [False, True], ids=["serve", "serve-and-tritonserver"])
def test_nothing_outlives_a_killed_serve(serve_resnet, also_kill_tritonserver):
    """kill -9 of `serve` (and of tritonserver with it): the server, its runners and their
    shared memory all go by themselves (parent-death signal, runner watchdog)."""
    runners = _runners(serve_resnet.pid)
    regions = [Path("/dev/shm", r.shm_region) for r in runners]
    assert runners and all(p.exists() for p in regions)
    os.kill(serve_resnet.proc.pid, signal.SIGKILL)
    if also_kill_tritonserver:
        os.kill(serve_resnet.pid, signal.SIGKILL)
    serve_resnet.proc.wait(timeout=30)
    _until(lambda: not _alive(serve_resnet.pid), "tritonserver to be gone")
    _until(lambda: not any(_alive(r.pid) for r in runners), "the runners to be gone")
    _until(lambda: not any(p.exists() for p in regions), "their /dev/shm regions to be gone")
