"""k-NN evaluation (dinoserve.training.knn) and `dinoserve eval knn`; file lists are in test_filelist.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from click.testing import CliRunner
from benchmarks.synthetic import make_image_folder

from dinoserve.cli import cli
from dinoserve.errors import DataError
from dinoserve.images import normalize, preprocess
from dinoserve.models import create_backbone, load_backbone
from dinoserve.training.knn import (
    KnnResult,
    evaluate_knn,
    evaluate_knn_set,
    extract_features,
    knn_classify,
    knn_classify_leave_one_out,
    knn_scores,
    paired_gap,
    prepare_knn_set,
    raw_pixel_features,
    standard_error,
)

SIZE = 32


@pytest.fixture(scope="module")
def knn_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ (5 per class) and val/ (2 per class) of circle/square/stripes, plus one corrupt file."""
    root = tmp_path_factory.mktemp("knn")
    make_image_folder(root / "train", per_class=5, size=40, seed=1)
    make_image_folder(root / "val", per_class=2, size=40, seed=2)
    (root / "train" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


@pytest.fixture(scope="module")
def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", depth=2, img_size=SIZE).eval()


def _save_dinoserve_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """The docs/DESIGN.md checkpoint layout, enough for dinoserve.models.load_backbone."""
    spec = model.dino_card
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"teacher": sd, "student": sd, "epoch": 1, "args": {},
                "meta": {"arch": spec.arch, "model_kwargs": spec.model_kwargs, "image_size": spec.image_size}},
               path)


# --- knn_classify -----------------------------------------------------------------------


def test_knn_classify_matches_hand_computation():
    bank = torch.tensor([[1.0, 0.0], [2.0, 0.2], [0.3, 1.0], [-1.0, 0.1]])
    labels = torch.tensor([0, 0, 1, 2])
    query = torch.tensor([[1.0, 1.0]])
    scores = knn_classify(bank, labels, query, k=3, temperature=0.5, num_classes=3)

    # By hand: cosines of (1,1)/sqrt(2) with the normalised bank rows are
    # 0.70711, 0.77396, 0.88047 and -0.63330; the top 3 are items 2, 1, 0.
    expected = [math.exp(0.70711 / 0.5) + math.exp(0.77396 / 0.5), math.exp(0.88047 / 0.5), 0.0]
    np.testing.assert_allclose(scores.numpy()[0], expected, rtol=1e-4)
    assert scores.shape == (1, 3)


def test_knn_classify_caps_k_and_rejects_bad_arguments():
    bank, labels = torch.eye(3), torch.tensor([0, 1, 2])
    scores = knn_classify(bank, labels, torch.eye(3), k=50)  # k > bank size: every item votes
    assert scores.argmax(1).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(bank, labels, bank, temperature=0)


def test_knn_separable_clusters_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 10
    bank_labels = torch.arange(5).repeat_interleave(30)
    query_labels = torch.arange(5).repeat_interleave(10)
    bank = centres[bank_labels] + torch.randn(150, 16, generator=g)
    queries = centres[query_labels] + torch.randn(50, 16, generator=g)
    scores = knn_classify(bank, bank_labels, queries, k=20, temperature=0.07)
    assert (scores.argmax(1) == query_labels).all()


def test_leave_one_out_equals_brute_force_reference():
    """Each item classified by a bank of all the others, one at a time, gives the same scores."""
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(41, 6, generator=g)
    feats[7] = feats[3]  # an exact duplicate: it must still find its twin, but never itself
    labels = torch.randint(0, 4, (41,), generator=g)
    fast = knn_classify_leave_one_out(feats, labels, k=5, temperature=0.1, num_classes=4, chunk=9)
    for i in range(len(feats)):
        others = torch.arange(len(feats)) != i
        ref = knn_classify(feats[others], labels[others], feats[i:i + 1], k=5, temperature=0.1, num_classes=4)
        torch.testing.assert_close(fast[i], ref[0], rtol=1e-5, atol=0)  # exp(sim / T) reaches 2e4
    with pytest.raises(ValueError, match="at least two"):
        knn_classify_leave_one_out(feats[:1], labels[:1])


def test_loo_protocol_pools_bank_and_queries_and_reports_its_error(tiny_vit, knn_folder):
    knn_set = prepare_knn_set(knn_folder, SIZE)
    bank = torch.randn(len(knn_set.bank_labels), 5, generator=torch.Generator().manual_seed(0))
    queries = torch.randn(len(knn_set.query_labels), 5, generator=torch.Generator().manual_seed(1))
    loo = knn_scores(bank, queries, knn_set, k=3, protocol="loo")
    labels = torch.from_numpy(np.concatenate([knn_set.bank_labels, knn_set.query_labels]))
    scores = knn_classify_leave_one_out(torch.cat([bank, queries]), labels, k=3, num_classes=knn_set.num_classes)
    expected = 100.0 * (scores.argmax(1) == labels).float().mean().item()
    assert (loo.protocol, loo.n_query, loo.n_bank) == ("loo", 21, 20)
    assert loo.top1 == pytest.approx(expected)
    assert loo.top1_se == pytest.approx(100 * math.sqrt(expected / 100 * (1 - expected / 100) / 21))
    assert knn_scores(bank, queries, knn_set, k=3).protocol == "split"
    with pytest.raises(ValueError, match="protocol"):
        knn_scores(bank, queries, knn_set, protocol="kfold")


def test_hits_are_the_queries_top1_got_right(tiny_vit, knn_folder):
    knn_set = prepare_knn_set(knn_folder, SIZE)
    bank = torch.randn(len(knn_set.bank_labels), 5, generator=torch.Generator().manual_seed(0))
    queries = torch.randn(len(knn_set.query_labels), 5, generator=torch.Generator().manual_seed(1))
    for protocol in ("split", "loo"):
        r = knn_scores(bank, queries, knn_set, k=3, protocol=protocol)
        assert r.hits.dtype == bool and len(r.hits) == r.n_query
        assert 100.0 * r.hits.mean() == pytest.approx(r.top1)
        assert "hits" not in r.to_dict()  # records stay JSON


def _result(hits: list[int], protocol: str = "loo") -> KnnResult:
    h = np.array(hits, dtype=bool)
    return KnnResult(100.0 * h.mean(), 100.0, 10, len(h), 0, protocol=protocol, hits=h)


def test_paired_gap_is_the_mean_and_error_of_per_query_differences():
    a, b = _result([1, 1, 0, 1, 0, 1]), _result([1, 0, 0, 0, 1, 1])
    gap, se = paired_gap(a, b)
    d = [0, 1, 0, 1, -1, 0]  # brute force: the sample mean and its standard error, in points
    mean = sum(d) / 6
    var = sum((x - mean) ** 2 for x in d) / 5
    assert gap == pytest.approx(100 * mean) and se == pytest.approx(100 * math.sqrt(var / 6))
    assert paired_gap(a, a) == (0.0, 0.0)


def test_paired_error_is_smaller_than_quadrature_when_models_agree():
    # 400 queries; the models share 300 right answers, a gets 30 more, b 10 more: a gap of 5
    # points that twice the quadrature error (5.6) cannot resolve and twice the paired one (3.1) can
    shared = [1] * 300 + [0] * 60
    a = _result(shared + [1] * 30 + [0] * 10)
    b = _result(shared + [0] * 30 + [1] * 10)
    gap, se = paired_gap(a, b)
    assert gap == pytest.approx(5.0)
    assert 2 * se < gap < 2 * math.hypot(a.top1_se, b.top1_se)


def test_paired_gap_refuses_results_on_other_queries():
    with pytest.raises(ValueError, match="same queries"):
        paired_gap(_result([1, 0, 1]), _result([1, 0]))
    with pytest.raises(ValueError, match="same queries"):
        paired_gap(_result([1, 0], "split"), _result([1, 0], "loo"))
    with pytest.raises(ValueError, match="per-query hits"):
        paired_gap(KnnResult(50.0, 50.0, 1, 2, 0), _result([1, 0]))


def test_standard_error_is_the_binomial_one():
    assert standard_error(50.0, 400) == pytest.approx(2.5)
    assert standard_error(100.0, 10) == 0.0
    assert math.isnan(standard_error(50.0, 0))


# --- features and evaluate_knn ------------------------------------------------------------


def test_extract_features_uses_eval_transform_and_skips_unreadable(tiny_vit, knn_folder):
    good = sorted((knn_folder / "val" / "square").glob("*.png"))
    items = [good[0], knn_folder / "train" / "circle" / "broken.png", good[1]]
    feats, kept, skipped = extract_features(tiny_vit, items, SIZE, batch_size=2)
    assert kept == [0, 2] and [i for i, _ in skipped] == [1]
    assert "broken.png" in skipped[0][1]
    # Reference: the shared transform + ImageNet normalisation, run directly.
    x = torch.from_numpy(normalize(np.stack([preprocess(p, SIZE) for p in (good[0], good[1])])))
    with torch.no_grad():
        ref = tiny_vit(x)
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-5)


def _reference_top1(model: torch.nn.Module, root: Path) -> float:
    """An independent numpy k-NN (k=20, T=0.07) over the folder's readable images."""
    def load(split: str):
        feats, labels = [], []
        for ci, cls in enumerate(sorted(p.name for p in (root / split).iterdir())):
            for p in sorted((root / split / cls).glob("*.png")):
                if p.name == "broken.png":
                    continue
                x = torch.from_numpy(normalize(preprocess(p, SIZE)[None]))
                with torch.no_grad():
                    f = model(x)[0].numpy()
                feats.append(f / np.linalg.norm(f))
                labels.append(ci)
        return np.array(feats), np.array(labels)

    bank, bl = load("train")
    qs, ql = load("val")
    correct = 0
    for q, label in zip(qs, ql):
        sims = bank @ q
        top = np.argsort(-sims)[:20]
        votes = np.zeros(3)
        np.add.at(votes, bl[top], np.exp(sims[top] / 0.07))
        correct += int(votes.argmax() == label)
    return 100.0 * correct / len(ql)


def test_evaluate_knn_on_class_folders_matches_reference(tiny_vit, knn_folder):
    result = evaluate_knn(tiny_vit, knn_folder, image_size=SIZE, batch_size=4)
    assert (result.n_bank, result.n_query, result.skipped) == (15, 6, 1)
    assert result.top1 == pytest.approx(_reference_top1(tiny_vit, knn_folder))
    assert result.top5 == 100.0  # 3 classes: the true class is always among the top 5


def test_csv_file_list_gives_the_same_result_as_folders(tiny_vit, knn_folder, tmp_path):
    rows = ["path,category,split"]
    for split, name in (("train", "knn_train"), ("val", "knn_val")):
        for p in sorted((knn_folder / split).rglob("*.png")):
            rows.append(f"{p.relative_to(knn_folder).as_posix()},{p.parent.name},{name}")
    rows.append("train/circle/circle_000.png,,pool")  # unlabelled rows of other splits are fine
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("\n".join(rows) + "\n")

    by_csv = evaluate_knn(tiny_vit, csv_path, root=knn_folder, image_size=SIZE)
    by_folder = evaluate_knn(tiny_vit, knn_folder, image_size=SIZE)
    assert by_csv == by_folder


def test_raw_pixel_baseline_separates_colour_classes(tmp_path):
    # Two classes of flat colours with a little noise: raw pixels must get them all right.
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for cls, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(colour) + rng.normal(0, 10, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
    knn_set = prepare_knn_set(tmp_path, 16)
    result = evaluate_knn_set(None, knn_set)
    assert (result.top1, result.n_bank, result.n_query) == (100.0, 12, 6)


def test_knn_data_errors(tiny_vit, tmp_path):
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="missing val/"):
        evaluate_knn(tiny_vit, tmp_path / "only_train", image_size=SIZE)
    csv_path = tmp_path / "pool_only.csv"
    (tmp_path / "a.png").write_bytes(b"x")
    csv_path.write_text("path,category,split\na.png,,pool\n")
    with pytest.raises(DataError, match=r"unknown split\(s\) 'knn_train', 'knn_val'; the file has pool"):
        evaluate_knn(tiny_vit, csv_path, image_size=SIZE)
    with pytest.raises(DataError, match="nothing_here: no such k-NN data"):
        evaluate_knn(tiny_vit, tmp_path / "nothing_here", image_size=SIZE)


# --- the CLI -------------------------------------------------------------------------------


def test_cli_eval_knn_on_a_saved_checkpoint(tiny_vit, knn_folder, tmp_path):
    ckpt = tmp_path / "checkpoint.pth"
    _save_dinoserve_checkpoint(tiny_vit, ckpt)
    res = CliRunner().invoke(cli, ["eval", "knn", "--weights", str(ckpt), "--data", str(knn_folder),
                                   "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    expected = evaluate_knn(load_backbone(ckpt), knn_folder, image_size=SIZE)
    assert out["arch"] == "vit_tiny_patch16_224" and out["image_size"] == SIZE
    assert (out["top1"], out["top5"], out["n_bank"], out["n_query"], out["skipped"]) == (
        expected.top1, expected.top5, 15, 6, 1)
    loo = evaluate_knn(load_backbone(ckpt), knn_folder, image_size=SIZE, protocol="loo")
    assert out["protocols"]["loo"]["top1"] == loo.top1 and out["protocols"]["loo"]["n_query"] == 21
    assert out["protocols"]["split"]["top1_se"] == round(expected.top1_se, 2)

    text = CliRunner().invoke(cli, ["eval", "knn", "-w", str(ckpt), "-d", str(knn_folder), "-k", "3",
                                    "--device", "cpu"])
    assert text.exit_code == 0 and "top-1" in text.output and "k=3" in text.output
    assert ", split: top-1" in text.output and ", loo: top-1" in text.output and "±" in text.output


def test_cli_eval_knn_against_pixels_and_a_second_model(tiny_vit, knn_folder, tmp_path):
    ckpt = tmp_path / "checkpoint.pth"
    _save_dinoserve_checkpoint(tiny_vit, ckpt)
    torch.manual_seed(3)
    other = tmp_path / "other.pth"
    _save_dinoserve_checkpoint(create_backbone("vit_tiny_patch16_224", depth=2, img_size=SIZE), other)
    base = ["eval", "knn", "-w", str(ckpt), "-d", str(knn_folder), "--device", "cpu", "-k", "3"]
    res = CliRunner().invoke(cli, [*base, "--against", "pixels", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    knn_set = prepare_knn_set(knn_folder, SIZE)
    mine = evaluate_knn_set(load_backbone(ckpt), knn_set, k=3, protocol="loo")
    raw = evaluate_knn_set(None, knn_set, k=3, protocol="loo")
    gap, se = paired_gap(mine, raw)
    loo = out["against"]["protocols"]["loo"]
    assert out["against"]["weights"] == "pixels" and loo["top1"] == raw.top1
    assert (loo["gain"], loo["gain_se"], loo["beyond_2se"]) == (round(gap, 2), round(se, 2), abs(gap) > 2 * se)
    # a second model: its figures are its own, the gain is ours minus its, on the same queries
    res = CliRunner().invoke(cli, [*base, "--against", str(other), "--protocol", "split"])
    assert res.exit_code == 0, res.output
    theirs = evaluate_knn_set(load_backbone(other), knn_set, k=3)
    gap, se = paired_gap(evaluate_knn_set(load_backbone(ckpt), knn_set, k=3), theirs)
    assert f"against {other}: top-1 {theirs.top1:.2f} %; gain {gap:+.2f} ± {se:.2f} points (paired)" in res.output
    res = CliRunner().invoke(cli, [*base, "--against", str(tmp_path / "none.pth")])
    assert res.exit_code == 1 and "none.pth: no such file" in res.output


def test_cli_eval_knn_bad_inputs_exit_1_with_message(tiny_vit, tmp_path):
    ckpt = tmp_path / "checkpoint.pth"
    _save_dinoserve_checkpoint(tiny_vit, ckpt)
    res = CliRunner().invoke(cli, ["eval", "knn", "-w", str(ckpt), "-d", str(tmp_path / "gone.csv"),
                                   "--device", "cpu"])
    assert res.exit_code == 1
    assert "gone.csv: no such k-NN data" in res.output
    res = CliRunner().invoke(cli, ["eval", "knn", "-w", str(tmp_path / "none.pth"), "-d", str(tmp_path)])
    assert res.exit_code == 1 and "none.pth: no such file" in res.output
    # the device is resolved as training resolves it (training.distributed.resolve_device)
    res = CliRunner().invoke(cli, ["eval", "knn", "-w", str(ckpt), "-d", str(tmp_path), "--device", "gpu0"])
    assert res.exit_code == 1 and "--device 'gpu0' is not a device; use auto, cpu, cuda or cuda:N" in res.output


def test_raw_pixel_features_centring():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 3, 2, 2), dtype=np.uint8)
    flat = pixels.reshape(4, -1).astype(np.float32) / 255
    per_image = raw_pixel_features(pixels)
    np.testing.assert_allclose(per_image.numpy(), flat - flat.mean(1, keepdims=True), atol=1e-6)
    per_bank = raw_pixel_features(pixels[:2], reference=pixels, centre="bank")
    np.testing.assert_allclose(per_bank.numpy(), flat[:2] - flat.mean(0, keepdims=True), atol=1e-6)
    with pytest.raises(ValueError, match="centre"):
        raw_pixel_features(pixels, centre="nope")
