"""OpenVINO as the second runtime: the same exported model.onnx, in-process and in the
serving runner, gives the embeddings onnxruntime gives; wrong combinations are clear errors.

Real components: the ONNX files of ``tiny_repo``, OpenVINO's CPU plugin, onnxruntime and a
real tritonserver process.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from dinoserve.cli import cli
from dinoserve.client import Client
from dinoserve.errors import ConfigError, ModelFileError
from dinoserve.openvino_session import OPENVINO_PROVIDER

pytest.importorskip("openvino", reason="the openvino extra is not installed")


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    # odd sizes and aspect ratios: the client resizes, the graph sees its own input size
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 70), (90, 45), (64, 64), (33, 51)]]


@pytest.mark.parametrize("model", ["resnet_tiny", "vit_tiny"])
def test_openvino_embeds_what_onnxruntime_embeds(tiny_repo, pictures, model):
    with Client(repo=tiny_repo, model=model) as ort_client, \
            Client(repo=tiny_repo, model=model, runtime="openvino") as ov_client:
        assert ov_client.info.provider == OPENVINO_PROVIDER and ort_client.info.provider != OPENVINO_PROVIDER
        expected = ort_client.embed(pictures, normalize=False)
        got = ov_client.embed(pictures, normalize=False)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-4 * float(np.abs(expected).max()), rtol=0)
        if model == "vit_tiny":  # the second output, and a second input size through the same graph
            np.testing.assert_allclose(ov_client.attention(pictures), ort_client.attention(pictures), atol=1e-5)


def test_openvino_cli_runtime_option(tiny_repo, tmp_path):
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.full((30, 50, 3), (200, 30, 90), np.uint8)).save(image)
    outs = {}
    for runtime in ("onnxruntime", "openvino"):
        r = CliRunner().invoke(cli, ["embed", str(image), "--repo", str(tiny_repo), "-m", "resnet_tiny",
                                     "--runtime", runtime, "--out", str(tmp_path / f"{runtime}.npy")])
        assert r.exit_code == 0, r.output
        outs[runtime] = np.load(tmp_path / f"{runtime}.npy")
    np.testing.assert_allclose(outs["openvino"], outs["onnxruntime"], atol=1e-5)


def test_openvino_wrong_combinations_and_damaged_files_are_one_line(tiny_repo, tmp_path):
    with pytest.raises(ConfigError, match="runtime 'openvino' runs on the CPU only, not device 'gpu'"):
        Client(repo=tiny_repo, model="resnet_tiny", runtime="openvino", device="gpu")
    with pytest.raises(ConfigError, match="runtime 'tflite': choose one of onnxruntime, openvino"):
        Client(repo=tiny_repo, model="resnet_tiny", runtime="tflite")
    with pytest.raises(ConfigError, match="runtime='openvino' is for the in-process client.*serve --runtime"):
        Client("http://127.0.0.1:9", model="resnet_tiny", runtime="openvino")
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "resnet_tiny", repo / "resnet_tiny")
    onnx = repo / "resnet_tiny" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:5000])
    with pytest.raises(ModelFileError) as e:
        Client(repo=repo, runtime="openvino")
    message = str(e.value)
    assert "\n" not in message and str(onnx) in message and "truncated or damaged" in message and "re-export" in message


@pytest.mark.triton
def test_triton_runner_on_openvino_serves_the_same_embeddings(tiny_repo, pictures):
    from dinoserve.triton import TritonServer

    with TritonServer(tiny_repo, models=["resnet_tiny"], runtime="openvino", startup_timeout=120) as server:
        assert server.runner_providers() == {"resnet_tiny": OPENVINO_PROVIDER}
        with Client(server.grpc_url, model="resnet_tiny", repo=tiny_repo) as served, \
                Client(repo=tiny_repo, model="resnet_tiny") as local:
            np.testing.assert_allclose(served.embed(pictures), local.embed(pictures), atol=1e-5)
    with pytest.raises(ConfigError, match="CPU only"):
        TritonServer(tiny_repo, runtime="openvino", device="cuda")
