"""int8 export (static QDQ) and its quality gate: a good int8 model is written and served
unchanged; a bad one is refused with its figures and leaves the repository byte-identical;
bad calibration data is a one-line error."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from benchmarks.synthetic import build_tiny_backbone, make_image_folder

from dinoserve.cli import cli
from dinoserve.client import Client
from dinoserve.cpu import PORTABLE, VNNI_ONLY, cpu_features
from dinoserve.errors import DataError, ExportError, ModelError
from dinoserve.export import export_onnx
from dinoserve.images import preprocess_batch
from dinoserve.models import load_backbone
from dinoserve.quantize import calibration_batch, int8_quality, neighbour_agreement, quantize_int8
from dinoserve.repository import read_model_config

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "dinoserve_resnet18_openclipart.safetensors"


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def calib_folder(tmp_path_factory) -> Path:
    """48 generated pictures (three shape classes)."""
    root = tmp_path_factory.mktemp("calib")
    make_image_folder(root, per_class=16, seed=5)
    return root


@pytest.fixture(scope="module")
def int8_repo(tmp_path_factory, calib_folder) -> tuple[Path, object]:
    """The shipped trained resnet18 at 64 px exported fp32 (``fp32``) and int8 (``int8``)."""
    repo = tmp_path_factory.mktemp("int8") / "model_repository"
    model = load_backbone(SHIPPED)
    export_onnx(model=model, name="fp32", repo=repo, image_size=64)
    res = export_onnx(model=model, name="int8", repo=repo, image_size=64, int8=True, calibration=calib_folder)
    return repo, res


def test_int8_export_passes_gate_and_records_precision(int8_repo):
    repo, res = int8_repo
    assert res.card.precision == "int8" and res.card.int8_scheme == PORTABLE
    assert res.int8.passed and res.int8.mean_cosine >= 0.99 and res.int8.top10_agreement >= 0.8
    assert res.int8.images == 48 and "48 images from" in res.calibration
    # The gate says where it ran: its figures hold for CPUs with the same int8 kernels.
    gate = res.int8.to_dict()
    assert gate["scheme"] == PORTABLE and gate["cpu_features"] == cpu_features() and gate["cpu"]
    cfg = read_model_config(repo / "int8")
    assert cfg.card.precision == "int8" and cfg.card.int8_scheme == PORTABLE and cfg.backend == "onnxruntime"
    assert read_model_config(repo / "fp32").card.precision == "fp32"
    ops = {n.op_type for n in onnx.load(str(res.onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # Only model.onnx beside the config: no leftover fp32 or calibration files.
    assert sorted(p.name for p in (repo / "int8" / "1").iterdir()) == ["model.onnx"]


def _int8_weights(path: Path) -> list[np.ndarray]:
    graph = onnx.load(str(path)).graph
    return [onnx.numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]


def test_portable_int8_weights_fit_in_seven_bits(int8_repo, calib_folder, tmp_path):
    """The portable scheme's weights keep |w| <= 64, so u8 x s8 pair sums stay under int16's
    limit on AVX2 kernels; the full-range scheme really uses 8 bits, but never -128, which ARM's
    NEON kernel without dot product would wrap on (tests/test_int8_arm64.py)."""
    fp32 = int8_repo[0] / "fp32" / "1" / "model.onnx"
    portable = _int8_weights(int8_repo[0] / "int8" / "1" / "model.onnx")
    assert len(portable) >= 20 and max(int(np.abs(w.astype(np.int32)).max()) for w in portable) <= 64
    batch, _ = calibration_batch(calib_folder, 64)
    full = _int8_weights(quantize_int8(fp32, tmp_path / "full.onnx", batch, scheme=VNNI_ONLY))
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in full) > 100
    assert min(int(w.min()) for w in full) == -127


def test_u8s8_model_refused_on_a_cpu_without_vnni(int8_repo, tmp_path, monkeypatch):
    """An int8 config exported before the scheme was recorded (full range) or marked u8s8 is
    refused by the in-process client where VNNI is missing; the portable one is served."""
    import shutil

    from dinoserve import cpu

    repo = tmp_path / "model_repository"
    shutil.copytree(int8_repo[0], repo)
    config = repo / "int8" / "config.pbtxt"
    text = config.read_text()
    assert '"u8s7"' in text
    shutil.copytree(repo / "int8", repo / "old")
    (repo / "old" / "config.pbtxt").write_text(  # an older export: no int8_scheme parameter
        text.replace('name: "int8"', 'name: "old"').replace('key: "int8_scheme"', 'key: "unused_scheme"'))
    monkeypatch.setattr(cpu, "cpu_flags", lambda *a: frozenset({"avx", "avx2", "fma"}))  # an AVX2 EPYC
    monkeypatch.delenv(cpu.ALLOW_ENV, raising=False)
    with Client(repo=repo, model="int8") as c:  # portable: served
        assert c.embed(np.zeros((64, 64, 3), np.uint8)).shape == (1, 512)
    with pytest.raises(ModelError) as e:
        Client(repo=repo, model="old")
    assert "avx512_vnni" in str(e.value) and "--int8-scheme u8s7" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelError, match="needs VNNI"):  # OpenVINO's CPU kernels saturate there too
        Client(repo=repo, model="old", runtime="openvino")
    monkeypatch.setattr(cpu, "cpu_flags", lambda *a: frozenset({"avx2", "avx512bw", "avx512_vnni"}))
    Client(repo=repo, model="old").close()  # the same model on a VNNI CPU: fine
    Client(repo=repo, model="old", runtime="openvino").close()


def test_client_serves_int8_unchanged(int8_repo, calib_folder):
    repo, _ = int8_repo
    images = sorted(str(p) for p in calib_folder.rglob("*.png"))[:12]
    with Client(repo=repo, model="fp32") as c32, Client(repo=repo, model="int8") as c8:
        assert c8.info.precision == "int8" and c8.info.embed_dim == c32.info.embed_dim == 512
        e32, e8 = c32.embed(images), c8.embed(images)
    assert e8.shape == e32.shape == (12, 512)
    assert np.all(np.sum(e8 * e32, axis=1) > 0.99)


def test_int8_vit_passes_gate(tmp_path, calib_folder):
    res = export_onnx(model=build_tiny_backbone("vit_tiny"), name="vit8", repo=tmp_path / "r", image_size=32,
                      int8=True, calibration=calib_folder)
    assert res.int8.passed and res.card.precision == "int8"
    batch, _, _ = preprocess_batch(sorted(calib_folder.rglob("*.png"))[:4], 48)  # dynamic size still works
    import onnxruntime as ort

    out = ort.InferenceSession(str(res.onnx_path), providers=["CPUExecutionProvider"]).run(None, {"images": batch})
    assert out[0].shape == (4, 192) and out[1].shape == (4, 3, 3, 3) and np.isfinite(out[0]).all()

    # Only products with a weight matrix are quantised; attention's activation x activation
    # products stay float (quantised, they pulled the softmax into a slow QLinearSoftmax).
    graph = onnx.load(str(res.onnx_path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    weights = {t.name for t in graph.initializer}

    def dequantised(name: str) -> bool:
        return name in producer and producer[name].op_type == "DequantizeLinear"

    def from_weight(name: str) -> bool:
        return dequantised(name) and producer[name].input[0] in weights

    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    linear = [n for n in matmuls if from_weight(n.input[1])]
    attention = [n for n in matmuls if not from_weight(n.input[1])]
    assert linear and all(dequantised(n.input[0]) for n in linear)
    assert attention and not any(dequantised(i) for n in attention for i in n.input)
    assert not any(n.op_type == "Softmax" and dequantised(n.input[0]) for n in graph.node)


def test_gate_refusal_leaves_repository_byte_identical(int8_repo, calib_folder, tmp_path):
    repo = tmp_path / "model_repository"
    import shutil

    shutil.copytree(int8_repo[0], repo)
    before = snapshot(repo)
    with pytest.raises(ExportError) as e:
        export_onnx(model=load_backbone(SHIPPED), name="int8", repo=repo, image_size=64, int8=True,
                    calibration=calib_folder, min_cosine=0.999999, min_agreement=1.0)
    msg = str(e.value)
    assert "int8 model refused" in msg and "mean cosine to fp32 0.99" in msg and "top-10 neighbour agreement" in msg
    assert "repository is unchanged" in msg and "\n" not in msg
    assert snapshot(repo) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_gate_fails_a_badly_calibrated_int8_model(int8_repo, calib_folder, tmp_path):
    """Ranges calibrated on near-black images clip every real activation: the gate sees it."""
    fp32 = int8_repo[0] / "fp32" / "1" / "model.onnx"
    dark = np.random.default_rng(0).integers(0, 3, (16, 3, 64, 64)).astype(np.uint8)
    bad = quantize_int8(fp32, tmp_path / "bad.onnx", dark)
    real, _ = calibration_batch(calib_folder, 64)
    q = int8_quality(fp32, bad, real)
    assert not q.passed and q.mean_cosine < 0.99
    good = int8_quality(fp32, int8_repo[0] / "int8" / "1" / "model.onnx", real)
    assert good.passed and good.mean_cosine > q.mean_cosine


def test_neighbour_agreement_values():
    x = np.random.default_rng(0).normal(size=(30, 8))
    assert neighbour_agreement(x, x) == 1.0
    assert neighbour_agreement(x, x * 3.0) == 1.0  # scale does not change cosine neighbours
    assert neighbour_agreement(x, np.random.default_rng(1).normal(size=(30, 8))) < 0.6


# --- bad calibration data ------------------------------------------------------------------


def test_missing_calibration_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"calibration data .*nope: no such file or folder; pass --calibration"):
        calibration_batch(tmp_path / "nope", 64)


def test_too_few_calibration_images(tmp_path):
    make_image_folder(tmp_path / "few", per_class=2)
    with pytest.raises(DataError, match=r"6 readable images of 6; int8 calibration needs at least 16"):
        calibration_batch(tmp_path / "few", 64)


def test_unreadable_calibration_images(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(20):
        (folder / f"x{i}.png").write_text("not a picture")
    with pytest.raises(DataError) as e:
        calibration_batch(folder, 64)
    assert "0 readable images of 20 (20 unreadable" in str(e.value) and "\n" not in str(e.value)


def test_calibration_from_csv(tmp_path, calib_folder):
    rows = ["path,category,split"] + [f"{p},x,train" for p in sorted(calib_folder.rglob("*.png"))]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    batch, where = calibration_batch(tmp_path / "list.csv", 32)
    assert batch.shape == (48, 3, 32, 32) and batch.dtype == np.uint8 and "list.csv" in where


def test_calibration_from_an_index(int8_repo, calib_folder, tmp_path):
    from dinoserve.index import build_index

    with Client(repo=int8_repo[0], model="fp32") as c:
        build_index(calib_folder, tmp_path / "x.index", c, progress=False)
    batch, where = calibration_batch(tmp_path / "x.index", 32)
    assert batch.shape == (48, 3, 32, 32) and "x.index" in where


def test_cli_int8_bad_input_exit_1(tmp_path, calib_folder):
    runner = CliRunner()
    base = ["export", "--onnx", "-w", str(SHIPPED), "--name", "m", "--repo", str(tmp_path / "r")]
    r = runner.invoke(cli, base + ["--int8", "--calibration", str(tmp_path / "none")])
    assert r.exit_code == 1 and "no such file or folder" in r.output
    r = runner.invoke(cli, base + ["--int8"])
    assert r.exit_code == 1 and "--calibration" in r.output and "name no training data" in r.output
    r = runner.invoke(cli, base + ["--int8", "--fp16", "--calibration", str(calib_folder)])
    assert r.exit_code == 1 and "exclude each other" in r.output
    r = runner.invoke(cli, base + ["--int8-scheme", "u8s8"])
    assert r.exit_code == 1 and "--int8-scheme is for --int8 exports only" in r.output
    assert not (tmp_path / "r").exists()


def test_cli_int8_prints_gate(tmp_path, calib_folder):
    r = CliRunner().invoke(cli, ["export", "--onnx", "-w", str(SHIPPED), "--name", "m", "--repo", str(tmp_path / "r"),
                                 "--image-size", "64", "--int8", "--calibration", str(calib_folder)])
    assert r.exit_code == 0, r.output
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["precision"] == "int8" and line["int8_gate"]["passed"] and line["int8_gate"]["mean_cosine"] >= 0.99
    assert line["int8_scheme"] == "u8s7" and line["int8_gate"]["cpu_features"] == cpu_features()


# --- served by the real tritonserver, unchanged ------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_triton_runner_refuses_u8s8_on_a_cpu_without_vnni(int8_repo, tmp_path, monkeypatch, runtime):
    """The runner decides with the server's CPU flags (here given as an AVX2 EPYC's): a u8s8
    model does not load, whichever runtime runs it, and the server's error carries the
    one-line reason and fix."""
    import shutil

    from dinoserve.cpu import FLAGS_ENV
    from dinoserve.errors import ServerError
    from dinoserve.triton import TritonServer

    repo = tmp_path / "repo"
    shutil.copytree(int8_repo[0] / "int8", repo / "int8")
    config = repo / "int8" / "config.pbtxt"
    config.write_text(config.read_text().replace('"u8s7"', '"u8s8"'))
    monkeypatch.setenv(FLAGS_ENV, "sse4_2 avx avx2 fma")
    server = TritonServer(repo, startup_timeout=120, runtime=runtime)
    with pytest.raises(ServerError) as e:
        server.start()
    assert "needs VNNI" in str(e.value) and "avx512_vnni" in str(e.value) and "--int8-scheme u8s7" in str(e.value)
    assert not server.is_running()


@pytest.mark.triton
def test_triton_serves_int8_and_reports_the_runner_provider(int8_repo, calib_folder):
    from dinoserve.ort_session import CPU, gpu_problem
    from dinoserve.triton import TritonServer

    repo, _ = int8_repo
    images = sorted(str(p) for p in calib_folder.rglob("*.png"))[:6]
    with TritonServer(repo, startup_timeout=120) as server:
        assert server.runner_providers() == {"fp32": CPU, "int8": CPU} or gpu_problem() is None
        assert server.status()["providers"] == server.runner_providers()
        with Client(server.grpc_url, model="int8", repo=repo) as c8, Client(repo=repo, model="fp32") as c32:
            assert c8.info.precision == "int8" and c8.info.provider == "triton"
            e8, e32 = c8.embed(images), c32.embed(images)
    assert np.all(np.sum(e8 * e32, axis=1) > 0.99)


@pytest.mark.triton
def test_serve_on_gpu_without_one_fails_naming_what_is_missing(int8_repo):
    from dinoserve.errors import ServerError
    from dinoserve.ort_session import gpu_problem
    from dinoserve.triton import TritonServer

    if gpu_problem() is None:
        pytest.skip("this machine can run onnxruntime on a GPU")
    server = TritonServer(int8_repo[0], models=["int8"], device="gpu", startup_timeout=60)
    with pytest.raises(ServerError) as e:
        server.start()
    assert "device 'gpu'" in str(e.value) and "onnxruntime-gpu" in str(e.value)
    assert not server.is_running()


def test_calibration_in_small_runs_gives_the_same_int8_graph(tmp_path, calib_folder, monkeypatch):
    """Calibration runs a few images at a time (its memory grows with the run); min/max
    ranges merge exactly, so the int8 graph is the one a single run over every image gives."""
    from dinoserve import quantize

    repo = tmp_path / "r"
    fp32 = export_onnx(model=build_tiny_backbone("vit_tiny"), name="v", repo=repo, image_size=32).onnx_path
    batch, _ = calibration_batch(calib_folder, 32)
    graphs, small = {}, quantize._CALIBRATION_BATCH
    for step in (small, len(batch)):
        monkeypatch.setattr(quantize, "_CALIBRATION_BATCH", step)
        out = quantize_int8(fp32, tmp_path / f"int8_{step}.onnx", batch, family="vit")
        graphs[step] = out.read_bytes()
    assert len(batch) > 2 * small and len(set(graphs.values())) == 1
    scales = [t for t in onnx.load_from_string(graphs[len(batch)]).graph.initializer if "scale" in t.name]
    assert scales  # really quantised
