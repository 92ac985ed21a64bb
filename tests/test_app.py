"""The Gradio app through a real server: tiny exported models, a real faiss index, gradio_client.

Two apps are launched in-process on free ports (a ViT and a ResNet, both from
``tiny_repo``), and every named endpoint is called the way a user's script would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.harness import free_port
from benchmarks.synthetic import make_image_folder

gr = pytest.importorskip("gradio", reason="the app needs gradio (pip install 'dinoserve[app]')")
from gradio_client import Client as GradioClient, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from dinoserve import app  # noqa: E402
from dinoserve.app.overlay import heatmap_overlay, renormalize, threshold_mask  # noqa: E402
from dinoserve.client import Client  # noqa: E402
from dinoserve.index import build_index  # noqa: E402

MAX_UPLOAD_MB = 1

# gradio's Dataframe uses pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:Warning"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning"),
]


@pytest.fixture(scope="module")
def gradio_tmp(tmp_path_factory):
    """Gradio's upload/cache folder for this module's servers (not the shared /tmp/gradio)."""
    folder = tmp_path_factory.mktemp("gradio")
    old = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = old


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """12 images to index, plus ``not_indexed.png`` added next to them after the build."""
    root = tmp_path_factory.mktemp("photos")
    make_image_folder(root, per_class=4, size=64, seed=3)
    return root


def _serve(client, index, gradio_tmp):
    demo = app.launch(client, index, port=free_port(), max_upload_mb=MAX_UPLOAD_MB,
                      prevent_thread_lock=True, quiet=True)
    return demo


def _served_app(model, tiny_repo, photos, gradio_tmp, index_dir, *, then_add_unindexed=False):
    """Yield (demo, gradio_client, dinoserve client, index path) for ``model``; clean up after."""
    client = Client(repo=tiny_repo, model=model)
    index_path = index_dir / "photos.index"
    build_index(photos, index_path, client, progress=False)
    if then_add_unindexed:
        Image.new("RGB", (64, 64), (1, 2, 3)).save(photos / "not_indexed.png")
    demo = _serve(client, index_path, gradio_tmp)
    gc = GradioClient(demo.local_url, verbose=False, download_files=str(gradio_tmp / "downloads"))
    try:
        yield demo, gc, client, index_path
    finally:
        gc.close()
        demo.close()
        client.close()


@pytest.fixture(scope="module")
def vit(tiny_repo, photos, gradio_tmp, tmp_path_factory):
    """(demo, gradio_client, dinoserve client, index path) for the tiny ViT."""
    yield from _served_app("vit_tiny", tiny_repo, photos, gradio_tmp, tmp_path_factory.mktemp("vit_index"),
                           then_add_unindexed=True)


@pytest.fixture(scope="module")
def resnet(tiny_repo, photos, gradio_tmp, tmp_path_factory):
    yield from _served_app("resnet_tiny", tiny_repo, photos, gradio_tmp, tmp_path_factory.mktemp("resnet_index"))


def _indexed(photos: Path) -> list[Path]:
    return sorted(p for p in photos.rglob("*.png") if p.name != "not_indexed.png")


# --- the endpoints ----------------------------------------------------------------------------
def test_app_exposes_three_named_endpoints_with_defaults(vit):
    _, gc, _, _ = vit
    api = gc.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(api) == {"/search", "/attention", "/embed"}
    for name, info in api.items():
        params = info["parameters"]
        assert params[0]["component"] == "Image", name
        assert all(p["parameter_has_default"] for p in params[1:]), name


def test_app_search_ranks_query_first(vit, photos):
    _, gc, client, index_path = vit
    for query in _indexed(photos)[::4]:
        gallery, table = gc.predict(handle_file(str(query)), 5, api_name="/search")
        rows = table["data"]
        assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
        assert rows[0][2] == str(query)
        assert rows[0][1] == pytest.approx(1.0, abs=1e-4)
        # Same hits and scores as the library call the app wraps.
        expected = client.search([query], index_path, k=5)[0]
        assert [r[2] for r in rows] == [h.path for h in expected]
        np.testing.assert_allclose([r[1] for r in rows], [h.score for h in expected], atol=1e-5)
        # The gallery shows those images, captioned with rank, score and path.
        assert len(gallery) == 5
        assert gallery[0]["caption"].startswith("1. 1.000")
        assert gallery[0]["caption"].endswith(f"{query.parent.name}/{query.name}")
        assert Path(gallery[0]["image"]).read_bytes() == query.read_bytes()


def test_app_search_k_defaults_and_is_capped_by_index_size(vit, photos):
    _, gc, _, _ = vit
    query = str(_indexed(photos)[0])
    _, table = gc.predict(handle_file(query), api_name="/search")
    assert len(table["data"]) == 8  # the default k
    _, table = gc.predict(handle_file(query), 12, api_name="/search")
    assert len(table["data"]) == 12  # every indexed image, and nothing else
    assert all(not r[2].endswith("not_indexed.png") for r in table["data"])
    _, table = gc.predict(handle_file(query), 13, api_name="/search")
    assert len(table["data"]) == 12  # more than the index holds: all of it
    with pytest.raises(AppError, match="k must be at least 1"):
        gc.predict(handle_file(query), 0, api_name="/search")
    with pytest.raises(AppError, match=r"threshold must be in \(0, 1\]"):
        gc.predict(handle_file(query), 1.5, api_name="/attention")


def test_app_attention_heads_sum_to_one_and_match_client(vit, photos):
    _, gc, client, _ = vit
    query = _indexed(photos)[5]
    heads, mean, kept, numbers = gc.predict(handle_file(str(query)), 0.6, api_name="/attention")
    raw = client.attention([query])[0].astype(np.float64)  # [3 heads, 2, 2] for 32 px / 16
    att = np.asarray(numbers["attention"])
    assert att.shape == raw.shape == (3, 2, 2)
    np.testing.assert_allclose(att.sum(axis=(1, 2)), 1.0, atol=1e-6)
    np.testing.assert_allclose(att, raw / raw.sum(axis=(1, 2), keepdims=True), atol=1e-6)
    # The raw maps leave out CLS->CLS, so they sum to a little less than 1.
    np.testing.assert_allclose(numbers["raw_sums"], raw.sum(axis=(1, 2)), atol=1e-5)
    assert all(0 < s < 1 for s in numbers["raw_sums"])
    # Threshold view: the smallest number of patches whose sorted share reaches t.
    mean_map = att.mean(axis=0).ravel()
    expected = int(np.argmax(np.cumsum(np.sort(mean_map)[::-1]) >= 0.6 - 1e-9)) + 1
    assert numbers["kept_patches"]["mean"] == expected
    assert len(heads) == 3 and len(kept) == 4
    assert [h["caption"] for h in heads] == ["head 0", "head 1", "head 2"]
    assert Image.open(mean).size[0] >= 320


def test_app_embed_equals_client_embed(vit, photos):
    _, gc, client, _ = vit
    query = _indexed(photos)[7]
    info, npy, js = gc.predict(handle_file(str(query)), api_name="/embed")
    expected = client.embed([query])[0]
    assert info["dim"] == 192 and info["model"] == "vit_tiny"
    np.testing.assert_allclose(info["embedding"], expected, atol=1e-6)
    np.testing.assert_allclose(np.load(npy), expected, atol=1e-7)
    np.testing.assert_allclose(json.loads(Path(js).read_text())["embedding"], expected, atol=1e-6)
    assert Path(npy).name == "embedding.npy" and Path(js).name == "embedding.json"


# --- bad input and safety ---------------------------------------------------------------------
def _bad_files(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    text = folder / "notes.png"
    text.write_text("this is not an image")
    truncated = folder / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:150])
    bomb = folder / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # 144 megapixels in a few KB
    return {
        "text": (text, r"notes\.png: not an image"),
        "truncated": (truncated, r"truncated\.png: corrupt or truncated"),
        "bomb": (bomb, r"bomb\.png: .*megapixels"),
    }


@pytest.mark.parametrize("kind", ["text", "truncated", "bomb"])
@pytest.mark.parametrize("endpoint", ["/search", "/attention", "/embed"])
def test_app_bad_upload_gives_clear_error(vit, photos, tmp_path, kind, endpoint):
    _, gc, _, _ = vit
    path, message = _bad_files(tmp_path, _indexed(photos)[0])[kind]
    with pytest.raises(AppError, match=message):
        gc.predict(handle_file(str(path)), api_name=endpoint)


def test_app_still_answers_after_bad_uploads(vit, photos, tmp_path):
    _, gc, _, _ = vit
    for path, _ in _bad_files(tmp_path, _indexed(photos)[0]).values():
        with pytest.raises(AppError):
            gc.predict(handle_file(str(path)), api_name="/embed")
    query = _indexed(photos)[1]
    _, table = gc.predict(handle_file(str(query)), 1, api_name="/search")
    assert table["data"][0][2] == str(query)


def test_app_refuses_uploads_over_the_size_limit(vit, tmp_path):
    demo, gc, _, _ = vit
    big = tmp_path / "big.png"
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    Image.fromarray(noise).save(big)
    assert big.stat().st_size > MAX_UPLOAD_MB * 2**20
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        gc.predict(handle_file(str(big)), api_name="/embed")
    # The server refuses it too, whatever the client checks.
    with open(big, "rb") as f:
        r = httpx.post(demo.local_url.rstrip("/") + "/gradio_api/upload", files={"files": ("big.png", f, "image/png")})
    assert r.status_code == 413


def test_app_serves_only_its_own_copies_of_index_images(vit, photos, tiny_repo):
    demo, gc, _, _ = vit
    workdir = demo.dinoserve_handlers.workdir
    base = demo.local_url.rstrip("/") + "/gradio_api/file="
    indexed = _indexed(photos)[0]
    gallery, _ = gc.predict(handle_file(str(indexed)), 3, api_name="/search")
    # What the browser gets is the index image itself, byte for byte ...
    assert Path(gallery[0]["image"]).read_bytes() == indexed.read_bytes()
    # ... served from the app's own folder, the only folder Gradio may serve.
    copies = sorted((workdir / "images").rglob("*.png"))
    assert copies and all(p.read_bytes() in {q.read_bytes() for q in _indexed(photos)} for p in copies)
    r = httpx.get(base + str(copies[0]))
    assert r.status_code == 200 and r.content == copies[0].read_bytes()
    refused = [
        "/etc/passwd",
        str(indexed),  # not even the originals are served from their own folder
        str(photos / "not_indexed.png"),
        str(next(tiny_repo.rglob("model.onnx"))),
        str(Path(__file__).resolve()),
        str(workdir / ".." / ".." / ".." / "etc" / "passwd"),
        str(workdir) + "/../../../../etc/passwd",
    ]
    for path in refused:
        r = httpx.get(base + path)
        assert r.status_code in (403, 404), path
        assert b"root:" not in r.content and b"PNG" not in r.content[:8]


def test_app_click_cannot_open_a_path_sent_by_the_browser(vit, photos):
    """The select event reads paths from server-side state: a forged payload has no path to give."""
    demo, _, _, _ = vit
    h = demo.dinoserve_handlers
    _, _, paths = h.search(str(_indexed(photos)[0]), 2)
    with pytest.raises(gr.Error, match="no longer on the page"):
        h.search_from_result(paths, 2, gr.SelectData(None, {"index": 7, "value": "/etc/passwd"}))


def test_app_binds_localhost_by_default(vit):
    demo, _, _, _ = vit
    assert demo.server_name == "127.0.0.1"
    assert demo.local_url.startswith("http://127.0.0.1:")


def test_app_port_in_use_is_a_clear_error(vit, gradio_tmp):
    from dinoserve.errors import ServerError

    _, _, client, index_path = vit
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerError, match=f"127.0.0.1:{port}.*--port"):
            app.launch(client, index_path, port=port, prevent_thread_lock=True, quiet=True)


def test_app_missing_index_image_is_left_out_of_the_gallery(vit, photos, tmp_path):
    demo, _, _, _ = vit
    h = demo.dinoserve_handlers
    assert h.servable(str(tmp_path / "deleted.png")) is None


# --- ResNet ----------------------------------------------------------------------------------
def test_app_resnet_attention_has_clear_message(resnet, photos):
    _, gc, _, _ = resnet
    with pytest.raises(AppError, match=r"resnet_tiny.*no attention output.*ViT"):
        gc.predict(handle_file(str(_indexed(photos)[0])), api_name="/attention")


def test_app_resnet_search_and_embed(resnet, photos):
    _, gc, client, _ = resnet
    query = _indexed(photos)[2]
    _, table = gc.predict(handle_file(str(query)), 3, api_name="/search")
    assert table["data"][0][2] == str(query)
    info, _, _ = gc.predict(handle_file(str(query)), api_name="/embed")
    np.testing.assert_allclose(info["embedding"], client.embed([query])[0], atol=1e-6)


# --- Triton ----------------------------------------------------------------------------------
@pytest.mark.triton
def test_app_on_triton_matches_embedded(triton_server, tiny_repo, vit, photos, gradio_tmp):
    """The same app over a real tritonserver gives the embedded client's answers."""
    _, _, embedded, index_path = vit
    client = Client(triton_server.http_url, model="vit_tiny", repo=tiny_repo)
    demo = _serve(client, index_path, gradio_tmp)
    gc = GradioClient(demo.local_url, verbose=False, download_files=str(gradio_tmp / "downloads"))
    try:
        query = _indexed(photos)[3]
        _, table = gc.predict(handle_file(str(query)), 3, api_name="/search")
        assert table["data"][0][2] == str(query)
        info, _, _ = gc.predict(handle_file(str(query)), api_name="/embed")
        np.testing.assert_allclose(info["embedding"], embedded.embed([query])[0], atol=1e-4)
        _, _, _, numbers = gc.predict(handle_file(str(query)), api_name="/attention")
        raw = embedded.attention([query])[0]
        np.testing.assert_allclose(numbers["attention"], raw / raw.sum(axis=(1, 2), keepdims=True), atol=1e-4)
    finally:
        gc.close()
        demo.close()
        client.close()


# --- handlers without a server ---------------------------------------------------------------
def test_app_clicked_result_becomes_next_query(vit, photos):
    demo, _, _, _ = vit
    h = demo.dinoserve_handlers
    _, _, paths = h.search(str(_indexed(photos)[0]), 4)
    event = gr.SelectData(None, {"index": 2, "value": None, "selected": True})
    query, _, table, new_paths = h.search_from_result(paths, 4, event)
    assert Path(query).read_bytes() == Path(paths[2]).read_bytes()  # shown as the new query
    assert table[0][2] == paths[2] and new_paths[0] == paths[2]


def test_app_missing_image_and_stale_click_are_clear_errors(vit):
    demo, _, _, _ = vit
    h = demo.dinoserve_handlers
    with pytest.raises(gr.Error, match="No image given"):
        h.search(None)
    with pytest.raises(gr.Error, match="Run a search first"):
        h.search_from_result([], 4, gr.SelectData(None, {"index": 0, "value": None}))


def test_app_read_upload_decodes_files_and_pasted_data(photos):
    import base64

    from dinoserve.app.upload import read_upload

    path = _indexed(photos)[0]
    from_file = read_upload({"path": str(path), "orig_name": path.name})
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    from_paste = read_upload({"url": url, "orig_name": "pasted.png"})
    assert from_file.mode == from_paste.mode == "RGB"
    assert np.array_equal(np.asarray(from_file), np.asarray(from_paste))
    assert read_upload(str(path)) == str(path)  # Python callers' values pass through
    assert read_upload(None) is None
    with pytest.raises(gr.Error, match="pasted.png: pasted data is not valid base64"):
        read_upload({"url": "data:image/png;base64,@@@", "orig_name": "pasted.png"})


# --- overlay maths ---------------------------------------------------------------------------
def test_app_threshold_mask_is_the_smallest_set_holding_t():
    rng = np.random.default_rng(0)
    for _ in range(50):
        att = rng.random((3, 4)) ** 3
        t = float(rng.uniform(0.05, 1.0))
        mask = threshold_mask(att, t)
        p = renormalize(att)
        assert p[mask].sum() >= t - 1e-9
        # Every kept patch outweighs every dropped one, and dropping the lightest kept patch
        # falls short of t: no smaller set can hold t.
        if (~mask).any():
            assert p[mask].min() >= p[~mask].max()
        assert p[mask].sum() - p[mask].min() < t


def test_app_renormalize_and_overlay():
    att = np.array([[[0.1, 0.2], [0.3, 0.38]], [[0, 0], [0, 0]]])
    p = renormalize(att)
    np.testing.assert_allclose(p.sum(axis=(1, 2)), 1.0)
    np.testing.assert_allclose(p[1], 0.25)  # no mass at all: uniform, not NaN
    img = Image.new("RGB", (64, 64), (128, 128, 128))
    out = heatmap_overlay(img, p[0])
    assert out.size == (64, 64)
    px = np.asarray(out)
    assert not np.array_equal(px[0, 0], px[63, 63])  # lowest and highest patch differ


# --- the command -------------------------------------------------------------------------------
def test_app_command_help_and_bad_index(tmp_path):
    from click.testing import CliRunner

    from dinoserve.cli import cli

    r = CliRunner().invoke(cli, ["app", "--help"])
    assert r.exit_code == 0
    for option in ("--index", "--url", "--repo", "--model", "--host", "--port", "--max-upload-mb"):
        assert option in r.output
    (tmp_path / "empty.index").mkdir()
    r = CliRunner().invoke(cli, ["app", "--index", str(tmp_path / "empty.index")])
    assert r.exit_code == 1
    assert "empty.index" in r.output and "Traceback" not in r.output


def test_app_command_refuses_another_model_than_the_index(vit, tiny_repo):
    from click.testing import CliRunner

    from dinoserve.cli import cli

    _, _, _, index_path = vit
    r = CliRunner().invoke(cli, ["app", "--index", str(index_path), "--repo", str(tiny_repo), "--model", "resnet_tiny"])
    assert r.exit_code == 1
    assert "vit_tiny" in r.output and "resnet_tiny" in r.output and "Traceback" not in r.output


def _app_folders(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("dinoserve-app-*"))


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_app_command_serves_on_localhost_and_cleans_up_on_signal(vit, tiny_repo, photos, tmp_path, signum):
    """A real `dinoserve app`: serves on 127.0.0.1, prints where (and no share-link hint it
    cannot act on), and on SIGTERM/SIGINT exits 0 leaving no dinoserve-app-* folder behind."""
    import signal as signals

    _, _, _, index_path = vit
    port = free_port()
    tmp = tmp_path / "tmp"  # the system temp directory, as the app process sees it
    tmp.mkdir()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path / "gradio"), TMPDIR=str(tmp))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dinoserve", "app", "--index", str(index_path), "--repo", str(tiny_repo),
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/gradio_api/info", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        info = httpx.get(url + "/gradio_api/info").json()
        assert set(info["named_endpoints"]) == {"/search", "/attention", "/embed"}
        gc = GradioClient(url, verbose=False, download_files=str(tmp_path / "downloads"))
        gc.predict(handle_file(str(_indexed(photos)[0])), 2, api_name="/search")  # copies index images
        gc.close()
        [folder] = _app_folders(tmp)
        assert list(folder.rglob("*.png"))
        proc.send_signal(getattr(signals, signum))
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert _app_folders(tmp) == []
    assert f"open http://127.0.0.1:{port}" in out
    assert "share=True" not in out and "public link" not in out
    assert "Traceback" not in out


def test_serve_app_warns_off_loopback_and_cleans_up_when_it_cannot_bind(vit, tmp_path, monkeypatch):
    """The one launch path: the warning for a non-loopback host comes first; a host it cannot
    bind (TEST-NET-1, not on this machine) is a clear error, and no app folder is left."""
    import tempfile

    from dinoserve.errors import ServerError

    _, _, client, index_path = vit
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    said: list[str] = []
    with pytest.raises(ServerError, match=r"cannot serve the app on 192\.0\.2\.1"):
        app.serve_app(client, index_path, host="192.0.2.1", port=free_port(), echo=said.append)
    assert len(said) == 1 and said[0].startswith("warning: --host 192.0.2.1") and "no login" in said[0]
    assert _app_folders(tmp_path) == []


def test_serve_app_port_in_use_names_the_option(vit, tmp_path, monkeypatch):
    import tempfile

    from dinoserve.errors import ServerError

    _, _, client, index_path = vit
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerError, match=f"127.0.0.1:{port}: the port is already in use.*--port"):
            app.serve_app(client, index_path, port=port, echo=lambda m: None)
    assert _app_folders(tmp_path) == []


def test_serve_app_refuses_an_index_of_another_model(vit, tiny_repo, tmp_path, monkeypatch):
    import tempfile

    from dinoserve.errors import IndexMismatchError

    _, _, _, index_path = vit
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with Client(repo=tiny_repo, model="resnet_tiny") as other:
        with pytest.raises(IndexMismatchError, match="vit_tiny"):
            app.serve_app(other, index_path, port=free_port(), echo=lambda m: None)
    assert _app_folders(tmp_path) == []


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True),
                                           ("::1", True), ("0.0.0.0", False), ("192.168.1.5", False),
                                           ("::", False), ("example.org", False)])
def test_app_is_loopback(host, loopback):
    assert app.is_loopback(host) is loopback
