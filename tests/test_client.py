"""The Client: embedded (onnxruntime) and Triton (HTTP, gRPC) backends, inputs, errors.

Real components: ONNX files exported into ``tiny_repo``, onnxruntime, a real tritonserver
process (``triton_server``), and small real HTTP/TCP servers that misbehave on purpose.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from benchmarks.harness import free_port
from benchmarks.synthetic import build_tiny_backbone
from dinoserve.cli import cli
from dinoserve.client import Client
from dinoserve.errors import (
    ConfigError,
    DinoserveError,
    ImageDecodeError,
    ImageNotFoundError,
    InferenceError,
    InputTypeError,
    ModelError,
    ModelFileError,
    ModelNotFoundError,
    ServerTimeoutError,
    ServerUnavailableError,
)
from dinoserve.images import normalize, preprocess
from dinoserve.ort_session import CPU, CUDA, TENSORRT, execution_providers, gpu_problem

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vit(tiny_repo):
    with Client(repo=tiny_repo, model="vit_tiny") as c:
        yield c


@pytest.fixture(scope="module")
def images(image_folder) -> list[Path]:
    return sorted(image_folder.rglob("*.png"))


def test_client_embedded_matches_pytorch(vit, images):
    torch = pytest.importorskip("torch")
    model = build_tiny_backbone("vit_tiny")
    batch = np.stack([preprocess(p, 32) for p in images[:6]])
    with torch.no_grad():
        ref = model(torch.from_numpy(normalize(batch))).numpy()
    raw = vit.embed(images[:6], normalize=False)
    np.testing.assert_allclose(raw, ref, atol=1e-4, rtol=1e-4)
    unit = vit.embed(images[:6])
    np.testing.assert_allclose(unit, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    assert unit.dtype == np.float32 and unit.shape == (6, 192)


def test_client_accepts_paths_bytes_pil_arrays_and_mixtures(vit, images):
    p = images[5]
    pil = Image.open(p)
    arr = np.asarray(pil.convert("RGB"))
    mixed = vit.embed([str(p), p, p.read_bytes(), pil, arr, np.asarray(pil.convert("L"))])
    assert mixed.shape == (6, 192)
    np.testing.assert_allclose(mixed[:5], np.repeat(mixed[:1], 5, 0), atol=1e-6)
    gray = vit.embed(Image.open(p).convert("L"))
    np.testing.assert_allclose(mixed[5], gray[0], atol=1e-6)
    assert vit.embed(p).shape == (1, 192)  # one image, not a list
    assert vit.embed([]).shape == (0, 192)


def test_client_batching_and_concurrency_do_not_change_results(tiny_repo, vit, images):
    whole = vit.embed(images)
    with Client(repo=tiny_repo, model="vit_tiny", batch_size=5, concurrency=3) as c:
        seen = []
        res = c.embed_detailed(images, progress=seen.append)
        assert res.kept == list(range(24)) and sum(seen) == 24 and len(seen) == 5
        np.testing.assert_allclose(res.vectors, whole, atol=1e-5)
        assert c.stats.images == 24 and c.stats.requests == 5


def test_client_bad_image_names_position_and_path(vit, images, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(images[0].read_bytes()[:50])
    inputs = [images[0], images[1], bad, images[2], tmp_path / "missing.jpg"]
    with pytest.raises(ImageDecodeError, match=r"image #2: .*broken\.png"):
        vit.embed(inputs)
    with pytest.raises(ImageNotFoundError, match=r"image #4: .*missing\.jpg"):
        vit.embed([images[0]] * 4 + [inputs[4]])
    res = vit.embed_detailed(inputs, on_error="skip")
    assert res.kept == [0, 1, 3] and [pos for pos, _ in res.skipped] == [2, 4]
    assert "broken.png" in res.skipped[0][1] and "missing.jpg" in res.skipped[1][1]
    np.testing.assert_allclose(res.vectors, vit.embed([images[0], images[1], images[2]]), atol=1e-6)
    with pytest.raises(ImageDecodeError, match=r"image #0: photo-7\.jpg"):
        vit.embed([b"not an image"], names=["photo-7.jpg"])
    with pytest.raises(ConfigError, match="on_error"):
        vit.embed(images[:1], on_error="ignore")


def test_client_attention_for_vit_and_clear_error_for_resnet(tiny_repo, vit, images):
    maps = vit.attention(images[:3])
    assert maps.shape == (3, 3, 2, 2) and maps.dtype == np.float32
    # Softmax rows over CLS + 4 patches: the patch part is positive and sums below 1.
    sums = maps.sum(axis=(2, 3))
    assert np.all(maps > 0) and np.all(sums < 1) and np.all(sums > 0.2)
    with Client(repo=tiny_repo, model="resnet_tiny") as resnet:
        assert resnet.embed(images[:2]).shape == (2, 512)
        with pytest.raises(ModelError, match="resnet_tiny.*no attention maps"):
            resnet.attention(images[:1])


@pytest.mark.parametrize("value, said", [
    (None, "got None"),
    (42, "got int 42"),
    (np.array(7, np.uint8), "got a 0-d numpy array (a scalar"),
    (np.zeros(5, np.uint8), "got a 1-d numpy array (shape (5,)"),
    (np.zeros((1, 2, 2, 2, 3), np.uint8), "got a 5-d numpy array"),
    ({"a.png": 1, "b.png": 2}, "got a dict with 2 keys"),
    ({"a.png"}, "got a set of 1 items"),
], ids=["none", "int", "0-d", "1-d", "5-d", "dict", "set"])
def test_client_wrong_argument_says_what_was_passed_and_what_is_accepted(vit, value, said):
    with pytest.raises(InputTypeError) as e:
        vit.embed(value)
    message = str(e.value)
    assert message.startswith("Client.embed: ") and said in message
    assert "a file path, encoded bytes, a PIL image, or a uint8 numpy array" in message and "list of them" in message
    assert isinstance(e.value, DinoserveError) and isinstance(e.value, TypeError)
    with pytest.raises(InputTypeError, match="Client.attention: "):
        vit.attention(value)


def test_client_wrong_item_in_a_list_is_named_even_when_skipping(vit, images):
    with pytest.raises(InputTypeError, match=r"image #1: .*unsupported input type int"):
        vit.embed_detailed([images[0], 42], on_error="skip")
    # A batch array of N images is N images, not a mistake.
    batch = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images[:3]])
    np.testing.assert_allclose(vit.embed(batch), vit.embed(list(batch)), atol=1e-6)


@pytest.fixture
def damaged_repo(tiny_repo, tmp_path):
    """A private copy of the vit_tiny model whose model.onnx a test may break."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "vit_tiny", repo / "vit_tiny")
    return repo


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_client_damaged_model_onnx_is_one_line_naming_file_and_fix(damaged_repo, images, tmp_path, damage):
    onnx = damaged_repo / "vit_tiny" / "1" / "model.onnx"
    data = onnx.read_bytes()
    onnx.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with pytest.raises(ModelFileError) as e:
        Client(repo=damaged_repo)
    message = str(e.value)
    assert "\n" not in message and str(onnx) in message and "re-export" in message
    assert ("empty (0 bytes)" if damage == "empty" else "truncated or damaged") in message
    for args in (["embed", str(images[0]), "--out", str(tmp_path / "e.npy")],
                 ["index", "build", str(images[0].parent), "--out", str(tmp_path / "x.index"), "--no-progress"]):
        r = CliRunner().invoke(cli, [*args, "--repo", str(damaged_repo)])
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert r.output.strip().count("\n") == 0 and str(onnx) in r.output and "re-export" in r.output
    assert not (tmp_path / "e.npy").exists() and not (tmp_path / "x.index").exists()


def test_execution_providers_never_ask_for_what_is_not_built_in():
    assert execution_providers("auto", [CPU]) == [CPU]
    assert execution_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert execution_providers("cpu", [CUDA, CPU]) == [CPU]
    with pytest.raises(ConfigError, match=f"needs onnxruntime's {CUDA}.*only {CPU}"):
        execution_providers("gpu", [CPU])
    with pytest.raises(ConfigError, match="unknown device 'tpu'; choose one of auto, cpu, gpu, cuda, tensorrt"):
        execution_providers("tpu", [CPU])


def test_execution_providers_prefer_tensorrt_then_cuda_then_cpu():
    gpu_build = [TENSORRT, CUDA, CPU]
    assert execution_providers("auto", gpu_build) == [TENSORRT, CUDA, CPU]
    assert execution_providers("gpu", gpu_build) == [TENSORRT, CUDA, CPU]
    assert execution_providers("gpu", [CUDA, CPU]) == [CUDA, CPU]
    assert execution_providers("cuda", gpu_build) == [CUDA, CPU]
    assert execution_providers("tensorrt", gpu_build) == [TENSORRT, CUDA, CPU]
    with pytest.raises(ConfigError, match=rf"device 'tensorrt' needs onnxruntime's {TENSORRT}.*\[gpu\]"):
        execution_providers("tensorrt", [CUDA, CPU])


@pytest.mark.skipif(gpu_problem() is None, reason="this machine can run onnxruntime on a GPU")
@pytest.mark.parametrize("device", ["gpu", "cuda", "tensorrt"])
def test_gpu_device_without_gpu_names_what_is_missing_and_never_falls_back(tiny_repo, device):
    with pytest.raises(ConfigError) as e:
        Client(repo=tiny_repo, model="resnet_tiny", device=device)
    msg = str(e.value)
    assert "\n" not in msg and f"device {device!r}" in msg and "use device 'auto' to allow the CPU" in msg
    assert "onnxruntime-gpu" in msg or "no NVIDIA GPU driver" in msg
    # "auto" is the user allowing the CPU: it runs, and says where.
    with Client(repo=tiny_repo, model="resnet_tiny", device="auto") as c:
        assert c.info.provider == CPU and c.info.to_dict()["provider"] == CPU and CPU in repr(c)
    # the same from the command line: one line, exit 1, nothing written
    r = CliRunner().invoke(cli, ["embed", "x.png", "--repo", str(tiny_repo), "-m", "resnet_tiny", "--device", device,
                                 "--out", "never.npy"])
    assert r.exit_code == 1 and r.output.strip().count("\n") == 0 and f"device {device!r}" in r.output
    assert not Path("never.npy").exists()


def test_device_is_for_the_in_process_client_only():
    with pytest.raises(ConfigError, match="device='cuda' is for the in-process client"):
        Client("http://127.0.0.1:9", device="cuda")


def test_embed_cli_lists_every_bad_file_and_names_skip_errors(vit, images, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(images[0].read_bytes()[:50])
    out = tmp_path / "emb.npy"
    args = ["embed", str(images[0]), str(bad), str(images[1]), str(tmp_path / "missing.jpg"), str(tmp_path),
            "--out", str(out), "--repo", str(vit.repo), "--model", "vit_tiny"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and not out.exists()
    assert "3 of 5 images cannot be used, nothing was written" in r.output and "--skip-errors" in r.output
    for name in ("broken.png", "missing.jpg: no such image file", f"{tmp_path}: is a folder"):
        assert name in r.output
    r = CliRunner().invoke(cli, [*args, "--skip-errors"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["shape"] == [2, 192] and summary["paths"] == [str(images[0]), str(images[1])]
    assert [s["path"] for s in summary["skipped"]] == [str(bad), str(tmp_path / "missing.jpg"), str(tmp_path)]
    np.testing.assert_allclose(np.load(out), vit.embed(images[:2]), atol=1e-6)


def test_client_model_choice_errors_list_the_models(tiny_repo, tmp_path, images):
    with pytest.raises(ModelNotFoundError, match="several models .*resnet_tiny, vit_tiny; pass one of them with --model"):
        Client(repo=tiny_repo)
    with pytest.raises(ModelNotFoundError, match="no model 'vit_huge'.*resnet_tiny, vit_tiny; pass one of them with --model"):
        Client(repo=tiny_repo, model="vit_huge")
    r = CliRunner().invoke(cli, ["embed", str(images[0]), "--out", str(tmp_path / "e.npy"), "--repo", str(tiny_repo),
                                 "--model", "vit_huge"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert f"model repository '{tiny_repo}' has no model 'vit_huge'; available: resnet_tiny, vit_tiny; " in r.output
    with pytest.raises(ModelNotFoundError, match="does not exist.*dinoserve export"):
        Client(repo=tmp_path / "nowhere")


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_client_server_down_names_url_and_hint(scheme):
    url = f"{scheme}://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnavailableError) as e:
        Client(url, timeout=5)
    assert url in str(e.value) and "dinoserve serve" in str(e.value)
    r = CliRunner().invoke(cli, ["embed", "x.png", "--out", "/dev/null", "--url", url])
    assert r.exit_code == 1 and url in r.output and "dinoserve serve" in r.output


def test_client_timeout_is_reported_not_retried():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ServerTimeoutError, match=r"timed out after 0.5 s.*--timeout"):
            Client(url, timeout=0.5)
    finally:
        silent.close()


def test_client_rejects_bad_urls():
    with pytest.raises(ConfigError, match="http://HOST:PORT"):
        Client("ftp://127.0.0.1:8000")


# --- a real tritonserver -----------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_client_triton_matches_embedded(triton_server, tiny_repo, vit, images, scheme):
    url = triton_server.http_url if scheme == "http" else triton_server.grpc_url
    with Client(url, model="vit_tiny", batch_size=4, concurrency=3) as remote:
        assert remote.info.image_size == 32 and remote.dim == 192
        assert remote.info.weights_sha256 == vit.info.weights_sha256
        got = remote.embed(images)
        np.testing.assert_allclose(got, vit.embed(images), atol=1e-4)
        raw = remote.embed(images[:4], normalize=False)
        np.testing.assert_allclose(raw, vit.embed(images[:4], normalize=False), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(remote.attention(images[:4]), vit.attention(images[:4]), atol=1e-4)
        assert remote.stats.requests >= 6  # 24 images in batches of 4
    with Client(url, model="resnet_tiny") as remote, Client(repo=tiny_repo, model="resnet_tiny") as local:
        np.testing.assert_allclose(remote.embed(images[:5]), local.embed(images[:5]), atol=1e-4)
        with pytest.raises(ModelError, match="no attention"):
            remote.attention(images[:1])


@pytest.mark.triton
def test_client_triton_unknown_model_lists_served_models(triton_server):
    with pytest.raises(ModelNotFoundError, match="no model 'nope'.*resnet_tiny, vit_tiny"):
        Client(triton_server.http_url, model="nope")
    with pytest.raises(ModelNotFoundError, match="several models"):
        Client(triton_server.grpc_url)


class _FlakyProxy:
    """A real HTTP proxy in front of Triton that answers the first N inference requests with
    a given status, then forwards everything. Counts the inference requests it saw."""

    def __init__(self, upstream: str, status: int, failures: int):
        self.upstream, self.status, self.failures, self.infer_calls = upstream.rstrip("/"), status, failures, 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self, method: str):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                if self.path.endswith("/infer"):
                    proxy.infer_calls += 1
                    if proxy.failures > 0:
                        proxy.failures -= 1
                        msg = json.dumps({"error": f"injected {proxy.status}"}).encode()
                        self.send_response(proxy.status)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(msg)))
                        self.end_headers()
                        self.wfile.write(msg)
                        return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                req = urllib.request.Request(proxy.upstream + self.path, data=body if method == "POST" else None,
                                             headers=headers, method=method)
                try:
                    resp = urllib.request.urlopen(req, timeout=30)
                    status, data, rheaders = resp.status, resp.read(), resp.headers
                except urllib.error.HTTPError as e:
                    status, data, rheaders = e.code, e.read(), e.headers
                self.send_response(status)
                for k, v in rheaders.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.triton
def test_client_retries_transient_failures_only(triton_server, vit, images):
    flaky = _FlakyProxy(triton_server.http_url, 503, failures=2)
    try:
        # A short backoff keeps the test short; the schedule itself is not under test.
        with Client(flaky.url, model="vit_tiny", retries=3, backoff=0.01, concurrency=1) as c:
            np.testing.assert_allclose(c.embed(images[:3]), vit.embed(images[:3]), atol=1e-4)
        assert flaky.infer_calls == 3  # two 503s, then success
    finally:
        flaky.close()
    broken = _FlakyProxy(triton_server.http_url, 400, failures=5)
    try:
        with Client(broken.url, model="vit_tiny", retries=3, concurrency=1) as c:
            with pytest.raises(InferenceError, match="injected 400"):
                c.embed(images[:3])
        assert broken.infer_calls == 1  # a client error is not retried
    finally:
        broken.close()


@pytest.mark.triton
def test_embed_cli_writes_npy_from_triton(triton_server, vit, images, tmp_path):
    out = tmp_path / "emb.npy"
    args = ["embed", *map(str, images[:4]), "--out", str(out), "--url", triton_server.grpc_url, "--model", "vit_tiny"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["shape"] == [4, 192] and summary["paths"] == [str(p) for p in images[:4]]
    np.testing.assert_allclose(np.load(out), vit.embed(images[:4]), atol=1e-4)


def test_client_fits_images_as_the_model_was_trained(tmp_path):
    """A model exported with fit="pad" is fed padded images by the client, one exported
    with the default by centre-cropped ones."""
    import torch

    from dinoserve.export import export_onnx
    from dinoserve.models import normalize_tensor

    model = build_tiny_backbone("resnet_tiny")
    export_onnx(model=model, name="padded", repo=tmp_path / "repo", image_size=64, fit="pad")
    export_onnx(model=model, name="cropped", repo=tmp_path / "repo", image_size=64)
    canvas = np.full((90, 240, 3), 255, np.uint8)
    canvas[30:60, 150:230] = (0, 90, 200)  # an object near the right edge, cut off by a centre crop
    with torch.no_grad():
        def reference(fit):
            x = torch.from_numpy(preprocess(canvas, 64, fit=fit)[None]).float().div(255)
            return model(normalize_tensor(x, model.dino_card.mean, model.dino_card.std)).numpy()
        padded_ref, cropped_ref = reference("pad"), reference("crop")
    with Client(repo=tmp_path / "repo", model="padded") as padded, \
            Client(repo=tmp_path / "repo", model="cropped") as cropped:
        assert padded.info.fit == "pad" and cropped.info.fit == "crop"
        np.testing.assert_allclose(padded.embed([canvas], normalize=False), padded_ref, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(cropped.embed([canvas], normalize=False), cropped_ref, atol=1e-4, rtol=1e-4)
    assert np.abs(padded_ref - cropped_ref).max() > 1e-2  # the two fits really differ
