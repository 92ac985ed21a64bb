"""`--engine ray`: Ray Data decoding in CPU tasks and an actor pool embedding, with resumable shards.

Real Ray (one local instance of 2 CPUs shared by this module's tests), real onnxruntime on the
exported ``tiny_repo`` models, real faiss. Every result is compared, value by value, with the
in-process path (:func:`dinoserve.index.build_index`, ``Client.embed``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from dinoserve import shard_store
from dinoserve.cli import cli
from dinoserve.client import Client
from dinoserve.errors import IndexMismatchError, ServerUnavailableError
from dinoserve.index import EmbeddingIndex, build_index, update_index
from dinoserve.ray_engine import RayOptions, build_index_ray, embed_paths, probe_address, start_local

ROOT = Path(__file__).resolve().parents[1]
SHARD = 5  # 27 files -> 6 shards: several per actor, a short last one


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray of 2 CPUs for the module (the engine uses an initialised Ray as it is)."""
    import ray

    start_local(num_cpus=2, object_store_memory=200 * 2**20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def vit(tiny_repo):
    with Client(repo=tiny_repo, model="vit_tiny") as c:
        yield c


@pytest.fixture(scope="module")
def photos(image_folder, tmp_path_factory) -> Path:
    """The 24 shared images plus three bad files (truncated, empty, not an image). Read-only."""
    dst = tmp_path_factory.mktemp("ray") / "photos"
    shutil.copytree(image_folder, dst)
    good = dst / "circle" / "circle_002.png"
    (dst / "broken").mkdir()
    (dst / "broken" / "truncated.png").write_bytes(good.read_bytes()[:60])
    (dst / "broken" / "empty.jpg").write_bytes(b"")
    (dst / "broken" / "text.png").write_text("not an image")
    return dst


@pytest.fixture(scope="module")
def reference(photos, vit, tmp_path_factory) -> EmbeddingIndex:
    """The in-process index of ``photos``: what every Ray run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "ref.index"
    build_index(photos, out, vit, progress=False)
    return EmbeddingIndex.load(out, mmap=False)


def _options(tiny_repo: Path, **kw) -> RayOptions:
    return RayOptions(repo=tiny_repo, model="vit_tiny", shard_size=SHARD, actors=1, progress=False, **kw)


def _assert_same_index(got_path: Path, ref: EmbeddingIndex) -> None:
    got = EmbeddingIndex.load(got_path, mmap=False)
    assert got.items == ref.items  # paths, sizes, mtimes and sha256, in the same order
    np.testing.assert_allclose(got.embeddings, ref.embeddings, rtol=0, atol=1e-6)
    for key in ("model", "preprocessing", "skipped", "count", "source", "kind"):
        assert got.meta[key] == ref.meta[key], key


def test_ray_index_build_and_embed_equal_the_inprocess_path_and_update_works(
        ray_local, tiny_repo, photos, reference, vit, tmp_path):
    out = tmp_path / "ray.index"
    report = build_index_ray(photos, out, _options(tiny_repo))
    assert (report.count, report.embedded, report.reused, report.kind) == (24, 24, 0, "flat")
    assert [Path(p).name for p, _ in report.skipped] == ["empty.jpg", "text.png", "truncated.png"]
    _assert_same_index(out, reference)
    assert not (tmp_path / "ray.index.shards").exists()  # removed once the index is published

    # `dinoserve index update` on the index built from shards: a new file is embedded, the rest kept.
    # The module's photos stay read-only: point a copy of the index at a copy of the folder
    # (meta.json is not checksummed), then add a mirrored image there.
    work, copy = tmp_path / "photos", tmp_path / "copy.index"
    shutil.copytree(photos, work)
    shutil.copytree(out, copy)
    meta_path = next(copy.glob("gen-*/meta.json"))
    meta = json.loads(meta_path.read_text())
    meta["source"]["path"] = str(work)
    meta_path.write_text(json.dumps(meta))
    ImageOps.mirror(Image.open(work / "square" / "square_001.png")).save(work / "square" / "mirrored.png")
    up = update_index(copy, vit, progress=False)
    # every old vector is reused by content (other paths), only the new image is embedded
    assert (up.count, up.embedded, up.reused, up.removed) == (25, 1, 24, 24)
    np.testing.assert_allclose(EmbeddingIndex.load(copy).embeddings, vit.embed(EmbeddingIndex.load(copy).paths),
                               rtol=0, atol=1e-6)

    # `dinoserve embed --engine ray` on the folder: same rows, vectors and skip messages as in-process.
    files = sorted([str(p) for p in reference.paths] + [s["path"] for s in reference.meta["skipped"]])
    runner = CliRunner()
    base = ["--repo", str(tiny_repo), "--model", "vit_tiny", "--skip-errors"]
    r1 = runner.invoke(cli, ["embed", *files, "--out", str(tmp_path / "a.npy"), *base])
    r2 = runner.invoke(cli, ["embed", str(photos), "--out", str(tmp_path / "b.npy"), *base, "--engine", "ray",
                             "--actors", "1", "--shard-size", str(SHARD)])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    j1, j2 = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (r1, r2))
    assert (j2["paths"], j2["skipped"], j2["shape"]) == (j1["paths"], j1["skipped"], j1["shape"])
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), np.load(tmp_path / "a.npy"), rtol=0, atol=1e-6)


def test_ray_resume_after_an_interrupted_run_embeds_only_missing_shards(ray_local, tiny_repo, photos, reference,
                                                                       tmp_path):
    out, shards = tmp_path / "x.index", tmp_path / "x.shards"
    written = []

    def interrupt(i: int) -> None:  # Ctrl-C after the second shard is on disk
        written.append(i)
        if len(written) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index_ray(photos, out, _options(tiny_repo), shards_dir=shards, on_shard=interrupt)
    assert not out.exists()
    on_disk = sorted(p.name for p in shards.iterdir() if p.name.startswith(("shard-", ".tmp")))
    assert on_disk == [f"shard-{i:06d}" for i in sorted(written)]  # whole shards only, no debris
    done_before = sum(json.loads((shards / n / "shard.json").read_text())["count"] for n in on_disk)

    report = build_index_ray(photos, out, _options(tiny_repo), shards_dir=shards, keep_shards=True)
    assert (report.reused, report.embedded) == (done_before, 24 - done_before) and done_before > 0
    _assert_same_index(out, reference)
    assert len([p for p in shards.iterdir() if p.name.startswith("shard-")]) == 6


def test_ray_killed_actor_is_retried_without_losing_or_duplicating_items(ray_local, tiny_repo, photos, reference,
                                                                        tmp_path):
    hold = tmp_path / "hold"
    hold.mkdir()
    out = tmp_path / "k.index"
    result: dict = {}

    def job() -> None:
        try:
            result["report"] = build_index_ray(photos, out, _options(tiny_repo, hold_dir=str(hold)))
        except BaseException as e:  # re-raised in the test thread below
            result["error"] = e

    t = threading.Thread(target=job)
    t.start()
    # The actor announces itself (file holding its pid) on its first shard, then waits for "release".
    first = None
    for _ in range(6000):  # at most 120 s: Ray start-up on a loaded machine
        started = sorted(hold.glob("started-*"))
        if started or not t.is_alive():
            first = started[0] if started else None
            break
        threading.Event().wait(0.02)
    assert first is not None, f"no actor reached a shard: {result.get('error')!r}"
    pid = int(first.read_text())
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)  # the embedding actor dies mid-shard
    (hold / "release").touch()
    t.join(timeout=300)
    assert not t.is_alive() and "error" not in result, result.get("error")
    shard = first.name.split("-")[1]
    pids = {p.name.split("-")[2] for p in hold.glob(f"started-{shard}-*")}
    assert len(pids) == 2  # Ray restarted the actor and retried the same shard in the new process
    assert result["report"].count == 24
    _assert_same_index(out, reference)


def test_ray_bad_input_one_line_errors(tiny_repo, photos, vit, tmp_path):
    # Shards of another model (other weights and size): refused before anything runs.
    shards = tmp_path / "s"
    with shard_store.ShardStore(shards, shard_store.job_record(vit.info, "index", True), vit.info):
        pass
    with pytest.raises(IndexMismatchError, match="holds shards of model 'vit_tiny'.*resnet_tiny"):
        embed_paths([str(p) for p in sorted(photos.rglob("*.png"))], shards,
                    RayOptions(repo=tiny_repo, model="resnet_tiny", progress=False))

    # A cluster address that does not answer: a clear error, without waiting on Ray's retries.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServerUnavailableError, match=f"127.0.0.1:{port}' does not answer"):
        probe_address(f"127.0.0.1:{port}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = ["index", "build", str(photos), "--out", str(tmp_path / "y.index"), "--repo", str(tiny_repo),
            "--model", "vit_tiny", "--engine", "ray"]
    cli_run = [sys.executable, "-m", "dinoserve"]
    r = subprocess.run(cli_run + args + ["--ray-address", f"127.0.0.1:{port}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"Ray cluster '127.0.0.1:{port}' does not answer" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    # No Ray installed: one line naming the extra.
    code = ("import sys; sys.modules['ray'] = None; from dinoserve.cli import main; "
            f"sys.argv = ['dinoserve', *{args!r}]; main()")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'pip install "dinoserve[ray]"' in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "y.index").exists()


@pytest.mark.triton
def test_ray_actors_with_a_triton_client_equal_the_inprocess_path(ray_local, triton_server, tiny_repo, photos,
                                                                  reference, tmp_path):
    out = tmp_path / "t.index"
    options = RayOptions(url=triton_server.grpc_url, model="vit_tiny", shard_size=SHARD, actors=2, actor_cpus=0.5,
                         progress=False)
    report = build_index_ray(photos, out, options)
    assert (report.count, report.embedded) == (24, 24)
    _assert_same_index(out, reference)


def test_ray_is_imported_only_when_a_ray_job_runs():
    code = ("import sys, dinoserve, dinoserve.client, dinoserve.index, dinoserve.ray_engine, dinoserve.shard_store\n"
            "from dinoserve.cli import cli\n"
            "from dinoserve.commands import embed, index\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'pyarrow'))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
