"""The embedding index: build, search, update, model checks, crash safety, approximate kinds.

Real onnxruntime on the exported ``tiny_repo`` models and real faiss; no mocks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from benchmarks.synthetic import make_image_folder
from dinoserve import index_kinds, index_store
from dinoserve.cli import cli
from dinoserve.client import Client
from dinoserve.errors import ConfigError, DataError, IndexDamagedError, IndexMismatchError, IndexStoreError
from dinoserve.index import EmbeddingIndex, Hit, build_index, search, update_index

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vit(tiny_repo):
    with Client(repo=tiny_repo, model="vit_tiny") as c:
        yield c


@pytest.fixture(scope="module")
def resnet(tiny_repo):
    with Client(repo=tiny_repo, model="resnet_tiny") as c:
        yield c


@pytest.fixture
def folder(image_folder, tmp_path) -> Path:
    """A private, writable copy of the 24-image folder."""
    dst = tmp_path / "photos"
    shutil.copytree(image_folder, dst)
    return dst


@pytest.fixture(scope="module")
def built(vit, image_folder, tmp_path_factory):
    """A read-only index of the shared image folder."""
    out = tmp_path_factory.mktemp("built") / "photos.index"
    report = build_index(image_folder, out, vit, progress=False)
    return out, report


def test_index_build_then_search_finds_each_image_first(built, vit, image_folder):
    out, report = built
    paths = sorted(str(p) for p in image_folder.rglob("*.png"))
    assert (report.count, report.embedded, report.skipped) == (24, 24, [])
    index = EmbeddingIndex.load(out)
    assert len(index) == 24 and sorted(index.paths) == paths
    assert index.meta["model"]["name"] == "vit_tiny" and index.meta["model"]["dim"] == 192
    assert index.meta["model"]["weights_sha256"] == vit.info.weights_sha256 != ""
    assert index.meta["preprocessing"]["image_size"] == 32
    hits = vit.search(paths, index, k=5)
    for path, row in zip(paths, hits):
        assert row[0].path == path and row[0].rank == 1
        assert row[0].score == pytest.approx(1.0, abs=1e-5)
        assert [h.rank for h in row] == [1, 2, 3, 4, 5]
        assert all(a.score >= b.score for a, b in zip(row, row[1:]))
    # Stored vectors are exactly what the client computes for those files.
    np.testing.assert_allclose(index.embeddings, vit.embed(index.paths), atol=1e-6)


def _ranks(queries: np.ndarray, keys: np.ndarray, similarity: bool = True) -> list[int]:
    """1-based rank of keys[i] for queries[i] (by similarity, or by distance)."""
    scores = queries @ keys.T if similarity else -((queries[:, None] - keys[None]) ** 2).sum(-1)
    return [int((np.argsort(-scores[i], kind="stable") == i).nonzero()[0][0]) + 1 for i in range(len(queries))]


def test_index_finds_flipped_and_resized_copies_in_top3(built, vit, image_folder):
    """Resized copies come back first; flipped copies in the top 3.

    The fixture model is random-init (deterministic seed), so it is not flip-invariant the way
    a DINO-trained one is (flips are part of DINO's augmentation). One synthetic picture is a
    trap for any feature: stripes whose period divides the width mirror into their own colour
    negative, which raw pixels rank last as well. So the rule is "top 3, or no worse than raw
    pixels rank that copy", and at least 20 of the 24 flipped copies must be in the top 3.
    """
    from dinoserve.images import preprocess

    index = EmbeddingIndex.load(built[0])
    originals = sorted(image_folder.rglob("*.png"))
    resized = [Image.open(p).convert("RGB").resize((100, 100), Image.Resampling.BILINEAR) for p in originals]
    for original, hits in zip(originals, vit.search(resized, index, k=3)):
        assert hits[0].path == str(original), f"resized copy of {original.name}: got {hits}"

    flipped = [ImageOps.mirror(Image.open(p).convert("RGB")) for p in originals]
    hits = vit.search(flipped, index, k=3)
    in_top3 = [str(o) in [h.path for h in row] for o, row in zip(originals, hits)]
    size = vit.info.image_size
    pixels = np.stack([preprocess(p, size).ravel() for p in originals]).astype(np.float32)
    pixels_flipped = np.stack([preprocess(im, size).ravel() for im in flipped]).astype(np.float32)
    pixel_rank = _ranks(pixels_flipped, pixels, similarity=False)
    model_rank = _ranks(vit.embed(flipped), vit.embed(originals))
    for o, ok, mr, pr in zip(originals, in_top3, model_rank, pixel_rank):
        assert ok or mr <= pr, f"flipped copy of {o.name}: model rank {mr}, raw-pixel rank {pr}"
    assert sum(in_top3) >= 20, f"only {sum(in_top3)} of 24 flipped copies in the top 3: {model_rank}"


def test_index_update_embeds_only_new_and_changed_and_drops_removed(folder, vit, tmp_path):
    out = tmp_path / "photos.index"
    build_index(folder, out, vit, progress=False)
    before = EmbeddingIndex.load(out)
    first_gen = index_store.current_generation(out).name

    removed = folder / "circle" / "circle_000.png"
    removed.unlink()
    changed = folder / "square" / "square_000.png"
    Image.open(folder / "stripes" / "stripes_003.png").rotate(90).save(changed)
    new_dir = folder / "new" / "deeper"
    make_image_folder(new_dir, per_class=1, seed=7)  # 3 new images, two levels down
    same_content = folder / "new" / "copy_of_circle_001.png"
    shutil.copy(folder / "circle" / "circle_001.png", same_content)

    report = update_index(out, vit, progress=False)
    assert (report.embedded, report.removed, report.count) == (4, 1, 24 - 1 + 3 + 1)
    assert report.reused == 24 - 2 + 1  # unchanged files plus the copy (same sha256)
    after = EmbeddingIndex.load(out)
    assert str(removed) not in after.paths and str(same_content) in after.paths
    assert index_store.current_generation(out).name != first_gen
    # Unchanged rows keep their exact vectors; changed and new rows are fresh embeddings.
    old_rows = {p: before.embeddings[i] for i, p in enumerate(before.paths)}
    for i, p in enumerate(after.paths):
        if p in old_rows and p != str(changed):
            np.testing.assert_array_equal(after.embeddings[i], old_rows[p])
    fresh = [str(changed), *sorted(str(p) for p in new_dir.rglob("*.png"))]
    got = {p: after.embeddings[after.paths.index(p)] for p in fresh}
    np.testing.assert_allclose(np.stack([got[p] for p in fresh]), vit.embed(fresh), atol=1e-6)
    assert vit.search([changed], after, k=1)[0][0].path == str(changed)

    again = update_index(out, vit, progress=False)
    assert (again.changed, again.embedded, again.count) == (False, 0, report.count)


def test_index_refuses_another_model(built, resnet, vit, folder):
    out = built[0]
    with pytest.raises(IndexMismatchError, match="vit_tiny.*resnet_tiny"):
        resnet.search([folder / "circle" / "circle_001.png"], out)
    with pytest.raises(IndexMismatchError, match="--model vit_tiny"):
        update_index(out, resnet, progress=False)
    with pytest.raises(IndexMismatchError, match="192"):
        EmbeddingIndex.load(out).search(np.zeros((1, 512), np.float32))


def test_index_skips_and_reports_corrupt_files(folder, vit, tmp_path):
    good = folder / "circle" / "circle_002.png"
    (folder / "broken").mkdir()
    (folder / "broken" / "truncated.png").write_bytes(good.read_bytes()[:60])
    (folder / "broken" / "empty.jpg").write_bytes(b"")
    (folder / "broken" / "text.png").write_text("not an image")
    out = tmp_path / "x.index"
    report = build_index(folder, out, vit, progress=False)
    skipped = dict(report.skipped)
    assert sorted(Path(p).name for p in skipped) == ["empty.jpg", "text.png", "truncated.png"]
    assert all(path in msg for path, msg in skipped.items())  # each message names its file
    assert report.count == 24
    meta = EmbeddingIndex.load(out).meta
    assert sorted(Path(s["path"]).name for s in meta["skipped"]) == ["empty.jpg", "text.png", "truncated.png"]

    result = CliRunner().invoke(cli, ["index", "build", str(folder), "--out", str(tmp_path / "y.index"),
                                      "--repo", str(vit.repo), "--model", "vit_tiny", "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("skipped")]
    assert len(lines) == 3 and any("truncated.png" in line for line in lines)
    for line in lines:  # each names its file once
        assert sum(line.count(p) for p in skipped) == 1, line


def _cli_build(source: Path, out: Path, repo: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """`dinoserve index build` in its own process; ``kill_at`` makes it SIGKILL itself at that phase."""
    env = dict(os.environ)
    if kill_at:
        env[index_store.KILL_AT_ENV] = kill_at
    cmd = [sys.executable, "-m", "dinoserve", "index", "build", str(source), "--out", str(out),
           "--repo", str(repo), "--model", "vit_tiny", "--no-progress"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize("phase", index_store.PHASES)
def test_index_build_killed_at_each_publishing_phase_recovers_on_its_own(phase, vit, tiny_repo, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    make_image_folder(old, per_class=1, size=32)  # 3 images
    make_image_folder(new, per_class=2, size=32, seed=5)  # 6 images
    out = tmp_path / "photos.index"
    build_index(old, out, vit, progress=False)
    build_index(old, out, vit, progress=False)  # gen-000002 live, gen-000001 kept as the previous one
    live = index_store.current_generation(out).name
    before = EmbeddingIndex.load(out)

    killed = _cli_build(new, out, tiny_repo, kill_at=phase)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    # What the kill left proves where it happened.
    entries = _entries(out)
    staging = [out / e for e in entries if e.startswith(".staging-")]
    expected_debris = {
        "staging": staging and not (staging[0] / index_store.META).exists(),
        "written": staging and (staging[0] / index_store.META).exists(),
        "renamed": "gen-000003" in entries and index_store.current_generation(out).name == live,
        "current-tmp": any(e.startswith(".CURRENT.") and e.endswith(".tmp") for e in entries),
        "published": entries.count("CURRENT") and len([e for e in entries if e.startswith("gen-")]) == 3,
    }
    assert expected_debris[phase], entries

    # A reader sees the last published generation, whole, without any help.
    after = EmbeddingIndex.load(out)
    if phase == "published":
        assert len(after) == 6 and index_store.current_generation(out).name == "gen-000003"
    else:
        assert index_store.current_generation(out).name == live and after.paths == before.paths
        np.testing.assert_array_equal(after.embeddings, before.embeddings)
    live_now = index_store.current_generation(out).name

    # The next writer of any kind cleans up on its own, and keeps the published generation.
    update_index(out, vit, progress=False)
    assert not [e for e in _entries(out) if e.startswith(".staging-") or e.startswith(".CURRENT.")]
    assert index_store.current_generation(out).name == live_now
    report = build_index(new, out, vit, progress=False)
    assert report.count == 6
    final = index_store.current_generation(out).name
    assert _entries(out) == sorted([".lock", "CURRENT", live_now, final])  # the live one and the one it replaced
    hit = search(vit, [new / "square" / "square_001.png"], out, k=1)[0][0]
    assert hit.path == str(new / "square" / "square_001.png")


def test_index_first_build_killed_before_publishing_leaves_no_index_and_rebuilds(vit, tiny_repo, tmp_path):
    src = tmp_path / "src"
    make_image_folder(src, per_class=1, size=32)
    out = tmp_path / "first.index"
    assert _cli_build(src, out, tiny_repo, kill_at="renamed").returncode == -signal.SIGKILL
    assert "gen-000001" in _entries(out)  # renamed, never published
    with pytest.raises(IndexStoreError, match="has no finished build"):
        EmbeddingIndex.load(out)
    build_index(src, out, vit, progress=False)
    assert _entries(out) == [".lock", "CURRENT", "gen-000001"] and len(EmbeddingIndex.load(out)) == 3


def test_index_kill_hook_refuses_an_unknown_phase(folder, vit, tmp_path, monkeypatch):
    monkeypatch.setenv(index_store.KILL_AT_ENV, "halfway")
    with pytest.raises(ConfigError, match="'halfway' is not a publishing phase; use one of staging, written"):
        build_index(folder, tmp_path / "x.index", vit, progress=False)


@pytest.fixture
def private_index(folder, vit, tmp_path) -> Path:
    out = tmp_path / "private.index"
    build_index(folder, out, vit, progress=False)
    return out


def _search_cli(query: Path, index: Path, repo: Path):
    return CliRunner().invoke(cli, ["search", str(query), "--index", str(index), "--repo", str(repo)])


@pytest.mark.parametrize("checksums", [True, False], ids=["checksummed", "older-index-without-checksums"])
def test_index_empty_embeddings_file_says_damaged_rebuild(private_index, folder, vit, checksums):
    gen = index_store.current_generation(private_index)
    if not checksums:
        meta = json.loads((gen / index_store.META).read_text())
        del meta["files"]
        (gen / index_store.META).write_text(json.dumps(meta))
    (gen / index_store.EMBEDDINGS).write_bytes(b"")
    with pytest.raises(IndexDamagedError) as e:
        EmbeddingIndex.load(private_index)
    message = str(e.value)
    assert f"{gen.name}/embeddings.npy" in message and "is damaged" in message
    assert f"rebuild it with `dinoserve index build {folder} --out {private_index}`" in message
    r = _search_cli(folder / "circle" / "circle_001.png", private_index, vit.repo)
    assert r.exit_code == 1 and "Aborted" not in r.output and "is damaged" in r.output and "rebuild" in r.output


def test_index_flipped_bytes_are_found_on_open_not_returned_as_neighbours(private_index, folder, vit):
    gen = index_store.current_generation(private_index)
    faiss_file = gen / index_store.FAISS
    data = bytearray(faiss_file.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    faiss_file.write_bytes(bytes(data))
    with pytest.raises(IndexDamagedError, match=r"index.faiss does not match the sha256 recorded when it was written"):
        EmbeddingIndex.load(private_index)
    r = _search_cli(folder / "circle" / "circle_001.png", private_index, vit.repo)
    assert r.exit_code == 1 and "is damaged" in r.output and "index build" in r.output
    with pytest.raises(IndexDamagedError):
        update_index(private_index, vit, progress=False)  # an update never builds on damaged vectors
    build_index(folder, private_index, vit, progress=False)  # the fix the message names
    assert len(EmbeddingIndex.load(private_index)) == 24


def test_index_checksums_of_every_data_file_are_in_meta(private_index):
    gen = index_store.current_generation(private_index)
    files = json.loads((gen / index_store.META).read_text())["files"]
    assert sorted(files) == sorted(index_store.CHECKED_FILES)
    for name, record in files.items():
        assert record == index_store.file_record(gen / name)


def test_index_stray_files_in_an_index_are_named_without_suggesting_out(private_index, vit):
    (private_index / "notes.txt").write_text("mine")
    with pytest.raises(IndexStoreError) as e:
        update_index(private_index, vit, progress=False)
    assert "holds files that are not part of it (notes.txt); move them elsewhere" in str(e.value)
    assert "--out" not in str(e.value)


def test_index_layout_keeps_previous_generation_and_locks_writers(folder, vit, tmp_path):
    out = tmp_path / "photos.index"
    for _ in range(3):
        build_index(folder, out, vit, progress=False)
    gens = sorted(p.name for p in out.glob("gen-*"))
    assert gens == ["gen-000002", "gen-000003"]
    assert (out / "CURRENT").read_text().strip() == "gen-000003"
    assert sorted(p.name for p in (out / "gen-000003").iterdir()) == sorted(
        ["meta.json", "items.jsonl", "embeddings.npy", "index.faiss"])
    item = json.loads((out / "gen-000003" / "items.jsonl").read_text().splitlines()[0])
    assert set(item) == {"path", "size", "mtime_ns", "sha256"} and len(item["sha256"]) == 64
    with index_store.Writer(out):
        with pytest.raises(IndexStoreError, match="another dinoserve process"):
            build_index(folder, out, vit, progress=False)
    assert (out / "CURRENT").read_text().strip() == "gen-000003"


def test_index_refuses_bad_destinations_and_sources(folder, vit, tmp_path):
    not_index = tmp_path / "docs"
    not_index.mkdir()
    (not_index / "notes.txt").write_text("mine")
    with pytest.raises(IndexStoreError, match="not a dinoserve index"):
        build_index(folder, not_index, vit, progress=False)
    assert (not_index / "notes.txt").read_text() == "mine"
    with pytest.raises(IndexStoreError, match="does not exist"):
        EmbeddingIndex.load(tmp_path / "missing.index")
    with pytest.raises(DataError, match="no image files"):
        build_index(tmp_path / "docs", tmp_path / "z.index", vit, progress=False)
    with pytest.raises(ConfigError, match="ivfpq needs at least"):
        build_index(folder, tmp_path / "q.index", vit, kind="ivfpq", progress=False)


def test_index_from_csv_list_with_split(image_folder, vit, tmp_path):
    paths = sorted(image_folder.rglob("*.png"))
    csv = tmp_path / "list.csv"
    lines = ["path,category,split"] + [
        f"{p.relative_to(image_folder)},{p.parent.name},{'bank' if i % 2 else 'query'}" for i, p in enumerate(paths)]
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "bank.index"
    report = build_index(csv, out, vit, splits=["bank"], root=image_folder, progress=False)
    index = EmbeddingIndex.load(out)
    assert report.count == 12 and sorted(index.paths) == [str(p) for i, p in enumerate(paths) if i % 2]
    assert index.meta["source"]["type"] == "csv" and index.meta["source"]["splits"] == ["bank"]


def test_index_cli_build_search_update(folder, vit, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.index"
    common = ["--repo", str(vit.repo), "--model", "vit_tiny"]
    r = runner.invoke(cli, ["index", "build", str(folder), "--out", str(out), "--no-progress", *common])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["count"] == 24
    query = folder / "square" / "square_004.png"
    r = runner.invoke(cli, ["search", str(query), "--index", str(out), "-k", "3", "--json", "--repo", str(vit.repo)])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)
    assert row["query"] == str(query) and row["hits"][0]["path"] == str(query)
    assert [h["rank"] for h in row["hits"]] == [1, 2, 3] and row["hits"][0]["score"] == pytest.approx(1, abs=1e-5)
    query.unlink()
    r = runner.invoke(cli, ["index", "update", str(out), "--no-progress", "--repo", str(vit.repo)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["removed"] == 1
    r = runner.invoke(cli, ["search", str(folder / "circle" / "circle_001.png"), "--index", str(out),
                            "--repo", str(vit.repo), "--model", "resnet_tiny"])
    assert r.exit_code == 1 and "was built with model 'vit_tiny'" in r.output
    r = runner.invoke(cli, ["index", "info", str(out)])
    assert r.exit_code == 0 and json.loads(r.output)["count"] == 23


def test_index_kinds_exact_and_approximate_recall():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, 32)).astype(np.float32)
    x = centers[rng.integers(0, 50, 3000)] + 0.3 * rng.normal(size=(3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:100]
    truth = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    s, i = index_kinds.exact_search(x, q, 10, block=700)  # blocks that do not divide N
    np.testing.assert_array_equal(np.sort(i, 1), np.sort(truth, 1))
    flat, _ = index_kinds.build(x, "flat")
    assert index_kinds.recall_at_k(flat, x) == 1.0
    hnsw, params = index_kinds.build(x, "hnsw")
    assert index_kinds.recall_at_k(hnsw, x, k=10, sample=300, kind="hnsw", params=params) >= 0.9
    ivfpq, params = index_kinds.build(x, "ivfpq")
    codes_only = index_kinds.recall_at_k(ivfpq, x, k=10, sample=300, kind="ivfpq", params={**params, "rerank": 1})
    reranked = index_kinds.recall_at_k(ivfpq, x, k=10, sample=300, kind="ivfpq", params=params)
    assert 0.2 <= codes_only < reranked and reranked >= 0.9, (codes_only, reranked, params)
    s, i = index_kinds.search(ivfpq, q, 10, kind="ivfpq", params=params, vectors=x)
    np.testing.assert_allclose(s, np.take_along_axis(q @ x.T, i, 1), atol=1e-5)  # exact scores


def test_index_hit_ranks_and_k_larger_than_index(built, vit):
    index = EmbeddingIndex.load(built[0])
    rows = index.search(index.embeddings[:2], k=100)
    assert [len(r) for r in rows] == [24, 24]
    assert isinstance(rows[0][0], Hit) and rows[0][-1].rank == 24


def test_index_hnsw_kind_records_recall_and_survives_update(folder, vit, tmp_path):
    out = tmp_path / "hnsw.index"
    report = build_index(folder, out, vit, kind="hnsw", progress=False)
    index = EmbeddingIndex.load(out)
    assert index.kind == "hnsw" and index.meta["kind_params"]["M"] == 32
    assert report.recall_at_10 == index.meta["recall_at_10"] == 1.0  # 24 vectors: the graph is exact
    assert vit.search([folder / "stripes" / "stripes_002.png"], index, k=1)[0][0].path.endswith("stripes_002.png")
    (folder / "stripes" / "stripes_002.png").unlink()
    update_index(out, vit, progress=False)
    assert EmbeddingIndex.load(out).kind == "hnsw" and len(EmbeddingIndex.load(out)) == 23


def test_index_same_model_name_with_other_weights_says_rebuild_not_model(built, tiny_repo, tmp_path, folder):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "vit_tiny", repo / "vit_tiny")
    config = repo / "vit_tiny" / "config.pbtxt"
    with Client(repo=tiny_repo, model="vit_tiny") as original:
        sha = original.info.weights_sha256
    assert sha and sha in config.read_text()
    config.write_text(config.read_text().replace(sha, "f" * 64))  # re-exported with other weights
    with Client(repo=repo, model="vit_tiny") as changed:
        with pytest.raises(IndexMismatchError) as e:
            changed.search([folder / "circle" / "circle_001.png"], built[0])
    message = str(e.value)
    assert "the weights differ" in message and "changed since the index was built" in message
    assert "use --model" not in message and "dinoserve index build" in message


def test_index_training_and_knn_list_the_same_files_of_a_folder(vit, tmp_path):
    """One folder rule: hidden files, symlinked duplicates and linked folders alike everywhere."""
    from dinoserve.filelist import find_images
    from dinoserve.training.knn import labelled_items

    data = tmp_path / "data"
    make_image_folder(data / "train", per_class=2, size=32)
    make_image_folder(data / "val", per_class=1, size=32, seed=1)
    train = data / "train"
    shutil.copy(train / "circle" / "circle_000.png", train / "circle" / ".hidden.png")
    os.symlink(train / "square" / "square_000.png", train / "square" / "a_link.png")
    make_image_folder(tmp_path / "outside", per_class=1, size=32, seed=2)
    os.symlink(tmp_path / "outside" / "stripes", train / "stripes" / "linked_folder")

    out = tmp_path / "train.index"
    build_index(train, out, vit, progress=False)
    indexed = EmbeddingIndex.load(out).paths
    trained = [str(p) for p in find_images(train)]
    bank = [str(p) for p, _ in labelled_items(data)[0]]
    assert indexed == trained == bank and len(indexed) == 6


@pytest.mark.parametrize("n,nq,k,block,step", [(5000, 300, 10, None, None), (5000, 300, 10, 333, 2**14),
                                               (7, 4, 10, None, None), (3000, 1, 50, 256, None)])
def test_exact_search_batches_equal_brute_force(n, nq, k, block, step, monkeypatch):
    """Many queries at once (in query chunks and row blocks, with the threshold path) give
    exactly the brute-force top-k, including fewer vectors than k (-1 rows, -inf scores)."""
    if step:
        monkeypatch.setattr(index_kinds, "EXACT_STEP_FLOATS", step)  # several query chunks
    rng = np.random.default_rng(n + nq)
    x = rng.normal(size=(n, 48)).astype(np.float32)
    q = rng.normal(size=(nq, 48)).astype(np.float32)
    s, i = index_kinds.exact_search(x, q, k, block=block)
    scores = q @ x.T
    kk = min(k, n)
    truth = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    np.testing.assert_array_equal(i[:, :kk], truth)  # continuous scores: no ties, order is exact
    np.testing.assert_allclose(s[:, :kk], np.take_along_axis(scores, truth, 1), rtol=1e-5, atol=1e-5)
    assert (i[:, kk:] == -1).all() and np.isneginf(s[:, kk:]).all()


def test_flat_index_search_many_queries_equals_brute_force(built):
    index = EmbeddingIndex.load(built[0])
    q = np.concatenate([index.embeddings, index.embeddings[::-1] * 0.5 + 0.1])  # 2N queries in one call
    hits = index.search(q, k=5)
    emb = np.asarray(index.embeddings)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    truth = np.argsort(-(qn @ emb.T), axis=1, kind="stable")[:, :5]
    assert len(hits) == len(q)
    for row, t in zip(hits, truth):
        assert [h.path for h in row] == [index.paths[j] for j in t]


def test_cli_search_a_folder_of_queries_at_once(built, vit, image_folder, tmp_path):
    """A folder argument is every image under it: one JSON line per query, each equal to
    the library's batched search of the same queries."""
    out, _ = built
    r = CliRunner().invoke(cli, ["search", str(image_folder / "circle"), str(image_folder / "square" / "square_004.png"),
                                 "--index", str(out), "-k", "4", "--json", "--repo", str(vit.repo)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.strip().splitlines()]
    queries = sorted(str(p) for p in (image_folder / "circle").rglob("*.png")) + [str(image_folder / "square" / "square_004.png")]
    assert [row["query"] for row in rows] == queries and len(rows) > 2
    expected = vit.search(queries, EmbeddingIndex.load(out), k=4)
    for row, hits in zip(rows, expected):
        assert [h["path"] for h in row["hits"]] == [h.path for h in hits]
        assert row["hits"][0]["path"] == row["query"]
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(cli, ["search", str(tmp_path / "empty"), "--index", str(out), "--repo", str(vit.repo)])
    assert r.exit_code == 2 and "a folder with no images in it" in r.output


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors around 100 fixed centres (the same for every seed: one distribution)."""
    centers = np.random.default_rng(dim).normal(size=(100, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = centers[rng.integers(0, 100, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_recall(found: np.ndarray, x: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    truth = np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found.tolist(), truth.tolist())]))


def test_ivfflat_tuned_to_a_recall_target_keeps_the_neighbours():
    """The sweep stops at the smallest nprobe that reaches the target, and new queries (not in
    the index) searched with it find that share of the brute-force neighbours."""
    x = _clustered(6000, 32)
    fresh = _clustered(300, 32, seed=9)  # same distribution, never indexed
    index, params = index_kinds.build(x, "ivfflat")
    chosen, recall, sweep = index_kinds.tune(index, x, "ivfflat", params, 0.95)
    assert recall >= 0.95 and sweep[-1] == {"nprobe": chosen["nprobe"], "recall_at_10": recall}
    assert all(step["recall_at_10"] < 0.95 for step in sweep[:-1]) and chosen["nprobe"] < params["nlist"]
    found = index_kinds.search(index, fresh, 10, kind="ivfflat", params=chosen)[1]
    assert _brute_recall(found, x, fresh) >= 0.93
    index_kinds.configure(index, "ivfflat", {"nprobe": params["nlist"]})  # every list: exact
    found = index_kinds.search(index, fresh, 10, kind="ivfflat")[1]
    assert _brute_recall(found, x, fresh) == 1.0


def test_unreachable_recall_target_names_the_best_found():
    x = _clustered(3000, 32)
    index, params = index_kinds.build(x, "ivfpq", {"m": 4, "rerank": 1})  # 8 bits per 8 dims: coarse codes
    with pytest.raises(index_kinds.RecallNotReached) as e:
        index_kinds.tune(index, x, "ivfpq", params, 0.99)
    msg = str(e.value)
    best = float(msg.split("the best found is ")[1].split()[0])
    assert 0 < best < 0.99 and "nprobe=" in msg and "m=4" in msg and "--kind ivfflat" in msg and "\n" not in msg
    assert index_kinds.recall_at_k(index, x, kind="ivfpq", params={**params, "nprobe": index.nprobe}) == \
        pytest.approx(best, abs=1e-4)
    with pytest.raises(ConfigError, match="a recall target is a fraction"):
        index_kinds.tune(index, x, "ivfpq", params, 1.5)


def test_index_built_with_recall_target_records_kind_params_and_recall(vit, tmp_path):
    """Published through the same path as build_index: the metadata holds the kind, the tuned
    nprobe, the target and the held-out recall, and the loaded index searches with them."""
    from dinoserve.index import build_index_from_embeddings

    x = _clustered(3000, vit.info.embed_dim, seed=3)
    rows = [{"path": f"/img/{i}.png", "size": 1, "mtime_ns": 0, "sha256": f"{i:064x}"} for i in range(len(x))]
    spec = {"type": "folder", "path": "/img"}
    out = tmp_path / "big.index"
    report = build_index_from_embeddings(out, spec, vit.info, rows, x, kind="ivfflat", recall=0.95)
    index = EmbeddingIndex.load(out)
    meta = index.meta
    assert index.kind == report.kind == "ivfflat" and meta["recall"]["target"] == 0.95
    assert meta["recall_at_10"] == meta["recall"]["at_10"] == report.recall_at_10 >= 0.95
    assert meta["kind_params"]["nprobe"] == meta["recall"]["sweep"][-1]["nprobe"]
    assert index._faiss.nprobe == meta["kind_params"]["nprobe"]
    fresh = _clustered(200, vit.info.embed_dim, seed=4)
    hits = index.search(fresh, k=10)
    found = np.array([[int(h.path.split("/")[-1].split(".")[0]) for h in row] for row in hits])
    assert _brute_recall(found, x, fresh) >= 0.9
    with pytest.raises(index_kinds.RecallNotReached):
        build_index_from_embeddings(tmp_path / "pq.index", spec, vit.info, rows, x, kind="ivfpq",
                                    kind_params={"m": 4, "rerank": 1}, recall=0.999)
    assert not (tmp_path / "pq.index" / "CURRENT").exists()  # nothing published


def test_cli_index_build_recall_option(folder, vit, tmp_path):
    runner = CliRunner()
    common = ["--no-progress", "--repo", str(vit.repo), "--model", "vit_tiny"]
    r = runner.invoke(cli, ["index", "build", str(folder), "--out", str(tmp_path / "a.index"), "--recall", "0.95", *common])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["kind"] == "flat"  # 24 images: auto is exact
    meta = EmbeddingIndex.load(tmp_path / "a.index").meta
    assert meta["recall"]["target"] == 0.95 and meta["recall"]["at_10"] == 1.0
    r = runner.invoke(cli, ["index", "build", str(folder), "--out", str(tmp_path / "b.index"), "--recall", "0", *common])
    assert r.exit_code == 2 and "--recall" in r.output
    r = runner.invoke(cli, ["index", "build", str(folder), "--out", str(tmp_path / "c.index"), "--kind", "ivfflat",
                            *common])
    assert r.exit_code == 1 and "needs at least 1000 images" in r.output


def test_ivfsq_reranks_8_bit_candidates_exactly():
    """IVF-SQ8: codes pick the candidates, the stored vectors score them, so scores are exact
    and the tuned recall holds for new queries."""
    x = _clustered(6000, 32)
    fresh = _clustered(300, 32, seed=9)
    index, params = index_kinds.build(x, "ivfsq")
    chosen, recall, _ = index_kinds.tune(index, x, "ivfsq", params, 0.95)
    assert recall >= 0.95 and chosen["rerank"] == 10
    s, i = index_kinds.search(index, fresh, 10, kind="ivfsq", params=chosen, vectors=x)
    np.testing.assert_allclose(s, np.take_along_axis(fresh @ x.T, i, 1), atol=1e-5)  # exact scores
    assert _brute_recall(i, x, fresh) >= 0.93
    codes_only = index_kinds.search(index, fresh, 10, kind="ivfsq", params={**chosen, "rerank": 1}, vectors=x)[0]
    assert not np.allclose(codes_only, s, atol=1e-5)  # without re-ranking the 8-bit scores are approximate
