"""python -m benchmarks.peer_lightly without its benchmark-only dependency: one line, exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# sys.modules["lightly"] = None makes `import lightly` raise ImportError, as on a machine without it
WITHOUT_LIGHTLY = ("import runpy, sys; sys.modules['lightly'] = None; "
                   "runpy.run_module('benchmarks.peer_lightly', run_name='__main__', alter_sys=True)")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_LIGHTLY, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_peer_lightly_without_lightly_names_the_extra_and_exits_2():
    done = _run("--epochs", "1")
    assert done.returncode == 2
    assert 'pip install -e ".[bench]"' in done.stderr
    assert "Traceback" not in done.stderr


def test_peer_lightly_help_needs_no_lightly():
    done = _run("--help")
    assert done.returncode == 0
    assert "--limit-images" in done.stdout


def test_each_epoch_count_keeps_its_own_results_file():
    from benchmarks.peer_lightly import result_name

    # a 50-epoch comparison must not overwrite the committed 5-epoch one
    assert len({result_name(5, None), result_name(50, None), result_name(5, 256)}) == 3
    done = _run("--epochs", "999", "--replot")
    assert done.returncode != 0
    assert "peer_lightly_999e.json does not exist" in done.stderr


def test_append_goes_on_with_a_seed_that_stopped_part_way_and_refuses_a_finished_one(tmp_path, monkeypatch):
    """A second seed spans sessions: --append --resume keeps the finished runs (of other
    seeds, and of a trainer that finished this seed first) and drops the stopped runs'
    partial rows (the resumed run brings them back); without --resume a finished one is refused."""
    import argparse

    import pytest

    from benchmarks import peer_lightly

    run = lambda seed, complete: {"seed": seed, "complete": complete, "epochs": [{"epoch": 1}]}  # noqa: E731
    (tmp_path / "peer_lightly_50e.json").write_text(json.dumps({
        "epochs": 50, "limit_images": None, "seeds": 2,
        "runs": {"lightly": [run(0, True), run(1, False)], "dinoserve": [run(0, True)]}}))
    monkeypatch.setattr(peer_lightly, "RESULTS", tmp_path)
    args = argparse.Namespace(epochs=50, limit_images=None, seeds=1, first_seed=1, trainers=["lightly", "dinoserve"],
                              resume=True)
    results = peer_lightly.previous_results(args)
    assert results["runs"] == {"lightly": [run(0, True)], "dinoserve": [run(0, True)]} and results["seeds"] == 2
    with pytest.raises(SystemExit, match="already has dinoserve seed 0, lightly seed 0"):
        peer_lightly.previous_results(argparse.Namespace(**{**vars(args), "first_seed": 0, "resume": False}))

    # lightly finished seed 1, ours stopped part-way: the same command goes on with ours only
    (tmp_path / "peer_lightly_50e.json").write_text(json.dumps({
        "epochs": 50, "limit_images": None, "seeds": 2,
        "runs": {"lightly": [run(0, True), run(1, True)], "dinoserve": [run(0, True), run(1, False)]}}))
    results = peer_lightly.previous_results(args)
    assert results["runs"] == {"lightly": [run(0, True), run(1, True)], "dinoserve": [run(0, True)]}
    with pytest.raises(SystemExit, match="already has lightly seed 1; --resume keeps them"):
        peer_lightly.previous_results(argparse.Namespace(**{**vars(args), "resume": False}))


def _epoch(split_hits: str, loo_hits: str, with_hits: bool) -> dict:
    row = {"epoch": 1}
    for p, h in (("split", split_hits), ("loo", loo_hits)):
        top1 = 100.0 * h.count("1") / len(h)
        row |= {f"{p}_top1": top1, f"{p}_se": 100.0 * (top1 / 100 * (1 - top1 / 100) / len(h)) ** 0.5}
    if with_hits:
        row["hits"] = {"split": split_hits, "loo": loo_hits}
    return row


def test_gaps_are_paired_when_both_runs_kept_their_hits_else_in_quadrature():
    """The paired error of two runs that agree on most queries is far below the quadrature
    one, and equals paired_gap on the same hits."""
    import numpy as np

    from benchmarks.peer_lightly import gaps
    from dinoserve.training.knn import KnnResult, paired_gap

    rng = np.random.default_rng(0)
    peer = rng.random(400) < 0.5
    ours = peer.copy()
    ours[rng.choice(400, 30, replace=False)] ^= True  # the two differ on 30 queries only
    s_peer, s_ours = ("".join("1" if h else "0" for h in x) for x in (peer, ours))
    for with_hits, kind in ((True, "paired"), (False, "quadrature")):
        runs = {"lightly": [{"seed": 0, "epochs": [_epoch(s_peer, s_peer, with_hits)]}],
                "dinoserve": [{"seed": 0, "epochs": [_epoch(s_ours, s_ours, with_hits)]}]}
        rows = gaps(runs)
        assert [(r["protocol"], r["se_kind"]) for r in rows] == [("split", kind), ("loo", kind)]
        gap = 100.0 * (ours.mean() - peer.mean())
        assert rows[0]["dinoserve_minus_lightly"] == round(gap, 2)
        if with_hits:
            expect = paired_gap(*(KnnResult(top1=0, top5=0, n_bank=0, n_query=400, skipped=0, hits=h) for h in (ours, peer)))
            assert rows[0]["se"] == round(expect[1], 2)
            paired = rows[0]["se"]
        else:
            assert rows[0]["se"] > 2 * paired  # quadrature ignores that both scored the same queries


def test_gaps_over_seeds_average_each_query_over_the_seeds_before_its_error():
    """Two seeds whose gaps point opposite ways on different queries average to their mean
    gap; the paired error comes from each query's difference averaged over the seeds (a
    brute-force reference here), an epoch only one seed reached is left out, and runs without
    hits fall back to the seeds' errors combined."""
    import numpy as np

    from benchmarks.peer_lightly import gaps_over_seeds

    rng = np.random.default_rng(1)
    peer = [rng.random(300) < 0.5 for _ in range(2)]
    ours = [p.copy() for p in peer]
    ours[0][:40] = True   # seed 0 gains on the first 40 queries
    ours[1][20:50] = False  # seed 1 loses on 30, half of them where seed 0 gained
    as_text = lambda h: "".join("1" if x else "0" for x in h)  # noqa: E731
    for with_hits, kind in ((True, "paired"), (False, "combined")):
        runs = {t: [{"seed": s, "epochs": [_epoch(as_text(h[s]), as_text(h[s]), with_hits)]} for s in (0, 1)]
                for t, h in (("lightly", peer), ("dinoserve", ours))}
        runs["dinoserve"][0]["epochs"].append({**runs["dinoserve"][0]["epochs"][0], "epoch": 2})  # seed 0 only
        runs["lightly"][0]["epochs"].append({**runs["lightly"][0]["epochs"][0], "epoch": 2})
        rows = gaps_over_seeds(runs)
        assert [(r["epoch"], r["protocol"], r["seeds"], r["se_kind"]) for r in rows] == [
            (1, "split", [0, 1], kind), (1, "loo", [0, 1], kind)]
        per_seed = [100.0 * (o.mean() - p.mean()) for o, p in zip(ours, peer)]
        assert rows[0]["per_seed"] == [round(g, 2) for g in per_seed]
        assert rows[0]["dinoserve_minus_lightly"] == round(float(np.mean(per_seed)), 2)
        if with_hits:
            d = [np.mean([float(ours[s][q]) - float(peer[s][q]) for s in (0, 1)]) for q in range(300)]
            assert rows[0]["se"] == round(100.0 * float(np.std(d, ddof=1) / np.sqrt(300)), 2)
        else:
            se = [np.hypot(runs["dinoserve"][s]["epochs"][0]["split_se"], runs["lightly"][s]["epochs"][0]["split_se"])
                  for s in (0, 1)]
            assert abs(rows[0]["se"] - float(np.hypot(*se)) / 2) < 0.011  # the seeds' errors are rounded first


def test_a_resumed_trainer_log_counts_training_time_not_the_pause():
    """Our trainer's log after a stop and a --resume holds two starts; the epoch that
    straddles them counts only from the restart, and no epoch is lost or doubled."""
    from benchmarks.peer_lightly import epochs_from_log

    knn = {"top1": 40.0, "top1_se": 2.6, "loo_top1": 45.0, "loo_top1_se": 1.2, "seconds": 3.0}
    rows = [{"event": "start", "time": 0.0},
            {"event": "epoch", "epoch": 0, "time": 100.0, "loss": 7.0}, {"event": "knn", "epoch": 0, "time": 103.0, **knn},
            {"event": "step", "epoch": 1, "time": 150.0},  # stopped here; a later session resumes
            {"event": "start", "time": 10_000.0},
            {"event": "epoch", "epoch": 1, "time": 10_060.0, "loss": 6.5}, {"event": "knn", "epoch": 1, "time": 10_063.0, **knn}]
    got = epochs_from_log(rows)
    assert [(e["epoch"], e["train_seconds"], e["loss"]) for e in got] == [(1, 100.0, 7.0), (2, 60.0, 6.5)]


def test_a_run_folder_that_holds_runs_is_refused_without_resume(tmp_path):
    (tmp_path / "dinoserve_seed0").mkdir()
    (tmp_path / "dinoserve_seed0" / "checkpoint.pth").write_bytes(b"x")
    done = _run("--epochs", "1", "--trainers", "dinoserve", "--out", str(tmp_path))
    assert done.returncode != 0
    assert "dinoserve_seed0/checkpoint.pth" in done.stderr and "--resume" in done.stderr
    assert "Traceback" not in done.stderr


class _Killed(Exception):
    pass


def test_lightly_recipe_resumes_exactly_where_it_stopped(tmp_path):
    """A lightly run killed after its first epoch's checkpoint, then resumed, ends with the
    same rows and the same teacher as one run straight through."""
    import pytest

    pytest.importorskip("lightly")
    import torch

    from benchmarks.peer_lightly import run_lightly
    from benchmarks.synthetic import make_image_folder
    from dinoserve.training import make_config
    from dinoserve.training.knn import prepare_knn_set

    make_image_folder(tmp_path / "shapes" / "train", per_class=4, size=48, seed=1)
    make_image_folder(tmp_path / "shapes" / "val", per_class=2, size=48, seed=2)
    knn_set = prepare_knn_set(tmp_path / "shapes", 32)
    cfg = make_config("cpu_small", data=str(tmp_path / "shapes" / "train"), out=str(tmp_path / "unused"), epochs=2,
                      global_crop_size=32, local_crop_size=16, local_crops=2, batch_size=8, seed=0, progress=False)

    late = run_lightly(cfg, 0, knn_set, tmp_path / "late.pth", deadline=0.0)  # --minutes already spent
    assert (late["complete"], late["epochs"], (tmp_path / "late.pth").exists()) == (False, [], False)
    straight = run_lightly(cfg, 0, knn_set, tmp_path / "straight.pth")

    def kill(run):
        raise _Killed

    with pytest.raises(_Killed):
        run_lightly(cfg, 0, knn_set, tmp_path / "resumed.pth", on_epoch=kill)
    assert len(torch.load(tmp_path / "resumed.pth", weights_only=True)["rows"]) == 1
    resumed = run_lightly(cfg, 0, knn_set, tmp_path / "resumed.pth")

    def scores(run):
        return [{k: v for k, v in e.items() if not k.endswith("seconds")} for e in run["epochs"]]

    assert straight["complete"] and resumed["complete"]
    assert scores(resumed) == scores(straight)
    a, b = (torch.load(tmp_path / f, weights_only=True)["teacher"] for f in ("straight.pth", "resumed.pth"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _tiny(tmp_path):
    """A small labelled folder, its k-NN set and a 2-epoch config over it (12 images, 1 step an epoch)."""
    from benchmarks.synthetic import make_image_folder
    from dinoserve.training import make_config
    from dinoserve.training.knn import prepare_knn_set

    make_image_folder(tmp_path / "shapes" / "train", per_class=4, size=48, seed=1)
    make_image_folder(tmp_path / "shapes" / "val", per_class=2, size=48, seed=2)
    knn_set = prepare_knn_set(tmp_path / "shapes", 32)
    cfg = make_config("cpu_small", data=str(tmp_path / "shapes" / "train"), out=str(tmp_path / "run"), epochs=2,
                      global_crop_size=32, local_crop_size=16, local_crops=2, batch_size=8, seed=0, progress=False,
                      precision="fp32", knn_data=str(tmp_path / "shapes"), knn_every=1, knn_image_size=32,
                      plan_to_time_limit=False)
    return knn_set, cfg


def test_lightly_recipe_continues_on_a_new_machine_from_its_packaged_teacher(tmp_path):
    """The run folder lost after epoch 1 (a fresh machine): the packaged teacher and record
    carry the run on; the rows of epoch 1 survive, and the record says where it was continued."""
    import pytest

    pytest.importorskip("lightly")
    import torch

    from benchmarks.peer_lightly import lightly_models, run_lightly
    from benchmarks.peer_state import load_lightly, read_record

    knn_set, cfg = _tiny(tmp_path)
    packaged = tmp_path / "progress" / "peer_seed0.safetensors"
    packaged.parent.mkdir()

    def kill(run):
        raise _Killed

    with pytest.raises(_Killed):
        run_lightly(cfg, 0, knn_set, tmp_path / "lost.pth", on_epoch=kill, packaged=packaged)
    first = torch.load(tmp_path / "lost.pth", weights_only=True)
    (tmp_path / "lost.pth").unlink()
    assert read_record(packaged)["epochs_done"] == 1

    nets = dict(zip(("student", "head", "teacher", "teacher_head"), lightly_models(seed=5)))
    load_lightly(packaged, nets)
    for student, teacher in (("student", "teacher"), ("head", "teacher_head")):
        for k, v in first[teacher].items():  # both start from the teacher, to fp16's precision
            assert torch.allclose(nets[student].state_dict()[k].float(), v.float(), rtol=1e-3, atol=1e-3), k
            assert torch.allclose(nets[teacher].state_dict()[k].float(), v.float(), rtol=1e-3, atol=1e-3), k

    run = run_lightly(cfg, 0, knn_set, tmp_path / "new.pth", packaged=packaged)
    assert run["complete"] and [e["epoch"] for e in run["epochs"]] == [1, 2]
    assert run["epochs"][0] == first["rows"][0]
    assert [(s["how"], s["first_epoch"], s["last_epoch"]) for s in run["segments"]] == [
        ("started", 0, 1), ("continued from the packaged teacher", 1, 2)]
    assert read_record(packaged)["epochs_done"] == 2 and "hits" in read_record(packaged)["rows"][-1]


def test_our_trainer_continues_on_a_new_machine_from_its_packaged_teacher(tmp_path):
    """Ours stopped after epoch 1 and its run folder lost: the next run goes on from the
    packaged teacher at epoch 1 (--pretrained, --start-epoch) and keeps epoch 1's row."""
    import dataclasses
    import shutil

    from benchmarks.peer_lightly import run_dinoserve
    from benchmarks.peer_state import read_record

    knn_set, cfg = _tiny(tmp_path)
    packaged = tmp_path / "progress" / "ours_seed0.safetensors"
    packaged.parent.mkdir()
    stopped = run_dinoserve(dataclasses.replace(cfg, max_steps=1), 0, knn_set, packaged=packaged)
    assert not stopped["complete"] and [e["epoch"] for e in stopped["epochs"]] == [1]
    assert read_record(packaged)["epochs_done"] == 1
    assert read_record(packaged)["teacher_steps_into_next_epoch"] == 0  # max_steps stopped it at an epoch's end
    shutil.rmtree(cfg.out)

    run = run_dinoserve(cfg, 0, knn_set, packaged=packaged)
    assert run["complete"] and [e["epoch"] for e in run["epochs"]] == [1, 2]
    assert run["epochs"][0] == stopped["epochs"][0]
    assert "hits" in run["epochs"][-1]
    assert [(s["how"], s["first_epoch"], s["last_epoch"]) for s in run["segments"]] == [
        ("started", 0, 1), ("continued from the packaged teacher", 1, 2)]
    assert read_record(packaged)["epochs_done"] == 2
    shutil.rmtree(cfg.out)  # a third machine finds the run complete in its record: nothing to train
    again = run_dinoserve(cfg, 0, knn_set, packaged=packaged)
    assert again["complete"] and again["epochs"] == run["epochs"] and again["precision"] == "fp32"
    assert not (Path(cfg.out) / "checkpoint.pth").exists()


def test_a_damaged_packaged_teacher_is_refused_in_one_line_naming_it(tmp_path):
    import pytest

    pytest.importorskip("lightly")
    from benchmarks.peer_lightly import run_lightly

    knn_set, cfg = _tiny(tmp_path)
    packaged = tmp_path / "peer_seed0.safetensors"
    packaged.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")  # a header that is not JSON
    packaged.with_suffix(".json").write_text(json.dumps(
        {"epochs_planned": 2, "steps_per_epoch": 1, "epochs_done": 1, "rows": [], "segments": []}))
    with pytest.raises(SystemExit) as e:
        run_lightly(cfg, 0, knn_set, tmp_path / "new.pth", packaged=packaged)
    assert str(packaged) in str(e.value) and "remove it" in str(e.value) and "\n" not in str(e.value)


def test_recipe_search_trains_each_arm_with_its_options_and_pairs_it_with_the_baseline(tmp_path):
    """Two arms of the search over one tiny plan: each checkpoint holds its arm's K, both keep
    their last epoch's hits, and the arm's gap to the baseline there is paired and is the
    difference of the two top-1s."""
    import pytest
    import torch

    from benchmarks import recipe_search

    knn_set, base = _tiny(tmp_path)
    root = tmp_path / "search"
    runs = {arm: [recipe_search.run_arm(base, arm, knn_set, root)] for arm in ("cpu_small", "k256")}
    for arm, k in (("cpu_small", 1024), ("k256", 256)):
        ckpt = torch.load(root / f"{arm}_seed0" / "checkpoint.pth", map_location="cpu", weights_only=True)
        assert ckpt["args"]["out_dim"] == k
    results = {"runs": runs}
    recipe_search.compare(results)
    last = [g for g in results["gaps"] if g["epoch"] == 2]
    assert [(g["arm"], g["protocol"], g["se_kind"]) for g in last] == [("k256", "split", "paired"),
                                                                       ("k256", "loo", "paired")]
    for g in last:
        ours, theirs = (runs[a][0]["epochs"][-1][f"{g['protocol']}_top1"] for a in ("k256", "cpu_small"))
        assert g["gap"] == pytest.approx(ours - theirs, abs=0.02)
    final = {r["arm"]: r for r in results["final"]}
    assert final["k256"]["loo_gap"]["se_kind"] == "paired" and "loo_gap" not in final["cpu_small"]


def test_every_search_arm_is_a_valid_config_and_a_changed_arm_is_refused(tmp_path, monkeypatch):
    """Each arm's options pass the trainer's checks on top of the base; a results file that
    measured an arm with other options than ARMS now gives is refused, naming the arm."""
    import pytest

    from benchmarks import recipe_search

    _, base = _tiny(tmp_path)
    for arm, options in recipe_search.ARMS.items():
        cfg = recipe_search.arm_config(base, arm, tmp_path / arm)
        assert all(getattr(cfg, k) == v for k, v in options.items()) and cfg.seed == base.seed
    path = tmp_path / "recipe_search_20e.json"
    path.write_text(json.dumps({"arms": {"k256": {"out_dim": 256}}, "runs": {}}))
    assert recipe_search.previous_results(path)["arms"] == {"k256": {"out_dim": 256}}
    path.write_text(json.dumps({"arms": {"k256": {"out_dim": 128}}, "runs": {}}))
    with pytest.raises(SystemExit, match="arm 'k256' was measured with"):
        recipe_search.previous_results(path)
