"""A DINO run of many CPU hours that survives sessions: start or resume it, watch it, keep it.

Small data needs hundreds of epochs (lightly's resnet18: 87 % k-NN on Imagenette after 200),
and two CPU cores give a few epochs an hour, so one run spans many sessions. This script
keeps such a run going:

    python -m benchmarks.long_run start     # start, or resume, in the background; returns at once
    python -m benchmarks.long_run status    # running?, epoch, k-NN so far
    python -m benchmarks.long_run package   # the current teacher -> weights/progress/<name>.*
    python -m benchmarks.long_run stop      # end the trainer, then package
    python -m benchmarks.long_run curve     # results/long_run_<name>.json + .png: k-NN vs epochs and CPU hours

- The checkpoint lives outside the repository (``$DINOSERVE_RUNS`` or
  ``~/.cache/dinoserve/runs/<name>``); ``start`` resumes it bit-exactly when it is there.
  A checkpoint of another configuration or a damaged one is refused by ``dinoserve train
  --resume``, with one line naming the file or the option that differs.
- While it runs, a supervisor packages the teacher after every k-NN evaluation: fp16
  backbone ``weights/progress/<name>.safetensors`` and its record ``<name>.json`` (both
  written to a temporary file and renamed, so an interrupted write leaves the previous pair).
  Commit them: they are what a later session has when the machine, and the checkpoint with
  it, is gone. ``start`` then goes on from those weights with ``--pretrained`` (student and
  teacher start from the packaged teacher, backbone and head) and ``--start-epoch``, so the
  plan continues where the record says it was, with its learning rate there; what is lost is
  the optimizer's momentum and the loss's center, both rebuilt within a few steps. The record
  says so, with the chain of earlier segments, so no epoch is lost and none counted twice.
- k-NN is logged every ``--knn-every`` epochs on the fixed split and the leave-one-out
  protocol (``dinoserve.training.knn``), each with its standard error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import OPENCLIPART_CSV, REPO, RESULTS, machine, read_log, train_seconds, write_json

#: The long runs this project keeps; each is ``dinoserve train`` options. Why each:
RECIPES: dict[str, list[str]] = {
    # lightly's small-data recipe (SGD, K 2048, BN head, teacher momentum 0.99 constant) at
    # the CPU's 64/32 px with 6 local crops: on an H200 it reached 54.5 % (split) / 58.7 %
    # (leave-one-out) on thumbnails after 43 of 129 planned epochs, still rising
    # (benchmarks/gpu_long_run.py); 150 epochs at batch 256 is ~20 CPU hours here
    "r18_sgd_64": ["-p", "cpu_small", "--local-crops", "6", "--optimizer", "sgd", "--lr", "0.06",
                   "--weight-decay", "5e-4", "--weight-decay-end", "5e-4", "--momentum-teacher", "0.99",
                   "--momentum-constant", "--out-dim", "2048", "--warmup-epochs", "10", "-b", "256",
                   "--epochs", "150", "--no-plan-to-time-limit"],
}


def _planned_epochs(name: str) -> int:
    recipe = RECIPES[name]
    return int(recipe[recipe.index("--epochs") + 1])


def _replanned(name: str, epochs: int) -> list[str]:
    """``name``'s recipe with another ``--epochs``."""
    recipe = RECIPES[name]
    at = recipe.index("--epochs") + 1
    return [*recipe[:at], str(epochs), *recipe[at + 1:]]


# r18_sgd_64 finished its 150 epochs still gaining; the same recipe replanned to 300 epochs
# goes on from its packaged teacher (backbone and head) at epoch 150, where a 300-epoch
# cosine schedule has its learning rate at half the peak
RECIPES["r18_sgd_64_300"] = _replanned("r18_sgd_64", 300)
#: runs that begin where another one's packaged weights end
CONTINUES: dict[str, str] = {"r18_sgd_64_300": "r18_sgd_64"}
KNN_EVERY = 2
PROGRESS = REPO / "weights" / "progress"


def run_dir(name: str) -> Path:
    base = os.environ.get("DINOSERVE_RUNS")
    return Path(base) / name if base else Path.home() / ".cache" / "dinoserve" / "runs" / name


def _pid(name: str) -> int | None:
    """The supervisor's pid when it is alive."""
    f = run_dir(name) / "supervisor.pid"
    try:
        pid = int(f.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def train_command(name: str, init: str | None) -> tuple[list[str], dict]:
    """The ``dinoserve train`` command that starts or continues ``name``, and how it begins."""
    out = run_dir(name)
    cmd = [str(Path(sys.executable).parent / "dinoserve"), "train", "-q", "-d", str(OPENCLIPART_CSV),
           "--split", "knn_train,pool", "-o", str(out), "--knn-data", str(OPENCLIPART_CSV),
           "--knn-every", str(KNN_EVERY), "--save-every", "10", *RECIPES[name]]
    packaged = PROGRESS / f"{name}.safetensors"
    if (out / "checkpoint.pth").is_file():
        return cmd + ["--resume"], {"how": "resumed", "checkpoint": str(out / "checkpoint.pth")}
    # the checkpoint is gone (a new machine): go on from the run's last packaged teacher, or,
    # before it has one, from the packaged teacher of the run it continues
    parent = None if packaged.is_file() else CONTINUES.get(name)
    if packaged.is_file() or parent:
        source = PROGRESS / f"{parent or name}.safetensors"
        record = json.loads(source.with_suffix(".json").read_text())
        at, planned = _last_epoch(record), _planned_epochs(name)
        if at >= planned:
            raise SystemExit(f"{name} is complete ({at} of {planned} epochs, packaged in {source}); "
                             f"nothing to continue. `curve` plots it; a new run needs a new name in RECIPES")
        (out / "continued_from.json").write_text(json.dumps(record))
        whose = f"{parent}'s " if parent else ""
        return cmd + ["--pretrained", str(source), "--start-epoch", str(at)], {
            "how": f"continued from {whose}packaged weights at epoch {at}",
            "pretrained": repo_relative(source), "first_epoch": at,
            "teacher_had_steps_of_first_epoch": record.get("teacher_steps_into_next_epoch", 0)}
    if init:
        return cmd + ["--pretrained", init], {"how": "started from given weights (new head)", "pretrained": init}
    return cmd, {"how": "started from scratch"}


def start(name: str, init: str | None) -> None:
    if _pid(name):
        print(f"{name} is already running (supervisor pid {_pid(name)}); `status` shows it")
        return
    out = run_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    cmd, how = train_command(name, init)
    segment = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **how, "command": cmd}
    with open(out / "segments.jsonl", "a") as f:
        f.write(json.dumps(segment) + "\n")
    log = open(out / "supervisor.out", "a")
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.long_run", "_supervise", name], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    (out / "supervisor.pid").write_text(str(proc.pid))
    starts = sum(1 for r in _log_rows(out) if r.get("event") == "start")
    for _ in range(300):  # a damaged checkpoint or a changed option fails in seconds: say it here
        if proc.poll() is not None:
            tail = (out / "supervisor.out").read_text().strip().splitlines()[-3:]
            raise SystemExit(f"{name}: the trainer stopped at once:\n" + "\n".join(tail))
        if sum(1 for r in _log_rows(out) if r.get("event") == "start") > starts:
            break
        time.sleep(1)
    print(f"{name}: {how['how']}; supervisor pid {proc.pid}; log {out / 'log.jsonl'}")


def supervise(name: str) -> None:
    """Run the trainer; package after each new k-NN row and when it ends."""
    out = run_dir(name)
    segments = [json.loads(line) for line in (out / "segments.jsonl").read_text().splitlines()]
    trainer = subprocess.Popen(segments[-1]["command"], stdout=sys.stdout, stderr=subprocess.STDOUT, cwd=REPO,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
    (out / "trainer.pid").write_text(str(trainer.pid))

    def forward(signum, _frame):  # `stop`: end the trainer, then package what it saved
        trainer.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    seen = len(_knn_rows(out))
    while trainer.poll() is None:
        time.sleep(30)
        rows = len(_knn_rows(out))
        if rows > seen:
            seen = rows
            package(name)
    print(f"trainer exited with {trainer.returncode}", flush=True)
    package(name)


def _log_rows(out: Path) -> list[dict]:
    return read_log(out / "log.jsonl")


def _knn_rows(out: Path) -> list[dict]:
    return [r for r in _log_rows(out) if r.get("event") == "knn"]


def package(name: str) -> Path | None:
    """The run's current teacher as fp16 safetensors + record in weights/progress (atomic)."""
    from dinoserve.atomic import atomic_write_text
    from dinoserve.models import file_sha256
    from dinoserve.training.checkpoint import package_teacher

    out = run_dir(name)
    ckpt_path = out / "checkpoint.pth"
    if not ckpt_path.is_file():
        print(f"{name}: no checkpoint at {ckpt_path} yet; nothing packaged")
        return None
    from dinoserve.errors import DinoserveError

    target = PROGRESS / f"{name}.safetensors"
    rows = _log_rows(out)
    if target.is_file() and not any(r.get("event") == "epoch" for r in rows):
        # a segment stopped before its first epoch ended holds nothing the packaged pair
        # lacks; packaging it would replace the record's k-NN figures with none
        print(f"{name}: no epoch finished since this segment began; the packaged weights stay as they were")
        return None
    try:
        # the head too, so that a continuation does not begin with a random one; the record
        # follows, until then the old one names fewer epochs
        facts = package_teacher(ckpt_path, target, with_head=True)
    except DinoserveError as e:
        print(f"{name}: not packaged, the packaged weights stay as they were: {e}", flush=True)
        return None
    segments = [json.loads(line) for line in (out / "segments.jsonl").read_text().splitlines()]
    knn = [r for r in rows if r.get("event") == "knn"]
    record = {
        # what `dinoserve demo --base` reads of a shipped model's record, so the demo can serve
        # or fine-tune a long run's teacher as it is
        "arch": facts["meta"]["arch"], "image_size": facts["meta"]["image_size"], "train_args": facts["args"],
        "knn_top1": knn[-1]["top1"] if knn else None,
        "name": name, "file": repo_relative(target), "file_sha256": file_sha256(target),
        "recipe": RECIPES[name], "first_epoch": _origin(segments).get("first_epoch", 0),
        "epochs_this_segment": facts["epoch"] - _origin(segments).get("first_epoch", 0),
        "steps_this_segment": facts["step"],
        # a stop at the time limit falls mid-epoch: the packaged teacher has trained these
        # steps of the next epoch, which a continuation from it runs again whole
        "teacher_steps_into_next_epoch": facts["epoch_step"],
        "planned_epochs": int(facts["args"]["epochs"]), "segment": _origin(segments)["how"],
        "segment_started_from": _origin(segments).get("pretrained"),
        "segment_started_utc": _origin(segments)["started_utc"],
        "earlier_segments": _earlier(out),
        "cpu_hours_this_segment": round(train_seconds(rows) / 3600, 2),
        "knn": [{**{k: r[k] for k in ("epoch", "top1", "top1_se", "loo_top1", "loo_top1_se") if k in r},
                 "hours": round(train_seconds(rows[:i + 1]) / 3600, 3)}
                for i, r in enumerate(rows) if r.get("event") == "knn"],
        "machine": machine(),
    }
    atomic_write_text(PROGRESS / f"{name}.json", json.dumps(record, indent=1) + "\n")
    print(f"{name}: packaged epoch {facts['epoch']} of {record['planned_epochs']} -> {target}", flush=True)
    return target


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (records travel with the repository)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _last_epoch(record: dict) -> int:
    """The plan's epoch a packaged record ends at (segments before ``first_epoch`` existed began at 0)."""
    return record.get("first_epoch", 0) + record["epochs_this_segment"]


def read_long_run_record(name: str) -> dict | None:
    """The long run ``name``'s packaged record in ``weights/progress``, or None when there is none."""
    f = PROGRESS / f"{name}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _origin(segments: list[dict]) -> dict:
    """The invocation that began the current checkpoint (later ones only resumed it)."""
    return next((s for s in reversed(segments) if s["how"] != "resumed"), segments[0])


def _earlier(out: Path) -> list[dict]:
    """The segments before the current checkpoint's: the record it was continued from, and
    that record's own earlier ones, so the chain of epochs survives lost checkpoints."""
    f = out / "continued_from.json"
    if not f.is_file():
        return []
    prev = json.loads(f.read_text())
    return [*prev.get("earlier_segments", []),
            {k: prev.get(k) for k in ("segment", "segment_started_from", "first_epoch", "epochs_this_segment",
                                      "cpu_hours_this_segment", "knn")}]


def status(name: str) -> None:
    out = run_dir(name)
    rows = _log_rows(out)
    epochs = [r for r in rows if r.get("event") == "epoch"]
    print(f"{name}: {'running, pid ' + str(_pid(name)) if _pid(name) else 'not running'}; folder {out}")
    if epochs:
        start = [r for r in rows if r.get("event") == "start"][-1]
        planned, per_epoch = int(start["args"]["epochs"]), start["steps_per_epoch"] * start["args"]["batch_size"]
        done, rate = epochs[-1]["epoch"] + 1, epochs[-1]["img_per_s"]
        left = (planned - done) * per_epoch / rate / 3600 if rate else float("nan")
        print(f"  epoch {done} of {planned}, loss {epochs[-1]['loss']:.3f}, {rate} img/s, "
              f"{train_seconds(rows) / 3600:.2f} h so far, about {left:.1f} h left at this speed")
    for r in _knn_rows(out):
        print(f"  k-NN after epoch {r['epoch'] + 1}: split {r['top1']:.1f} ± {r.get('top1_se', float('nan')):.1f}, "
              f"leave-one-out {r.get('loo_top1', float('nan')):.1f} ± {r.get('loo_top1_se', float('nan')):.1f}")


def stop(name: str) -> None:
    pid = _pid(name)
    if pid is None:
        print(f"{name} is not running")
    else:
        os.kill(pid, signal.SIGTERM)  # the supervisor ends the trainer and packages
        for _ in range(120):
            if _pid(name) is None:
                break
            time.sleep(1)
    package(name)


def curve_points(record: dict) -> tuple[list[dict], int, float]:
    """Every k-NN row of a packaged record and the segments before it, on one axis of
    epochs and CPU hours counted from the first segment; with the totals."""
    points, epoch0, hours0 = [], 0, 0.0
    for seg in [*record["earlier_segments"], record]:
        first = seg.get("first_epoch") or 0  # a continued segment logs the plan's epochs
        for r in seg["knn"]:
            epoch = r["epoch"] - first + 1  # 1-based, within the segment
            # records before per-row hours: the segment's hours shared out evenly over its epochs
            hours = r.get("hours", seg["cpu_hours_this_segment"] * epoch / max(1, seg["epochs_this_segment"]))
            points.append({**r, "epoch": epoch0 + epoch, "hours": round(hours0 + hours, 3),
                           "hours_estimated": "hours" not in r, "segment": seg["segment"]})
        epoch0 += seg["epochs_this_segment"]
        hours0 += seg["cpu_hours_this_segment"]
    return points, epoch0, hours0


def curve(name: str) -> None:
    """k-NN against epochs and CPU hours, every segment of the run, as JSON and PNG."""
    record = read_long_run_record(name)
    if record is None:
        raise SystemExit(f"{name}: no packaged record in {PROGRESS}; run `package` first")
    points, epoch0, hours0 = curve_points(record)
    path = write_json(f"long_run_{name}", {"name": name, "points": points, "epochs": epoch0, "cpu_hours": round(hours0, 2),
                                          "record": record["file"], "machine": machine()})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocol = RESULTS / "knn_protocol.json"  # benchmarks/knn_protocol.py: raw pixels at the run's 64 px
    floor = json.loads(protocol.read_text())["sizes"].get("64", {}).get("raw_pixels") if protocol.is_file() else None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, x, xlabel in ((axes[0], "epoch", "epoch (all segments)"),
                          (axes[1], "hours", "hours of training on 2 CPU cores (early segments: estimated)")):
        for key, label in (("top1", "fixed split (343 queries)"), ("loo_top1", "leave-one-out (1,677)")):
            pts = [p for p in points if key in p]
            ax.errorbar([p[x] for p in pts], [p[key] for p in pts], yerr=[2 * p[key + "_se"] for p in pts],
                        marker="o", markersize=3, capsize=2, label=label)
        for key, colour in (("split", "C0"), ("loo", "C1")):  # the floor to beat, measured the same way
            if floor:
                ax.axhline(floor[key]["top1"], color=colour, linestyle="--", linewidth=1,
                           label=f"raw pixels, {'fixed split' if key == 'split' else 'leave-one-out'}")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("k-NN top-1 % (bars: 2 standard errors)")
    axes[0].legend()
    fig.suptitle(f"{name}: {epoch0} epochs, {hours0:.1f} hours of training on the CPU")
    fig.tight_layout()
    fig.savefig(RESULTS / f"long_run_{name}.png", dpi=110)
    print(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["start", "status", "package", "stop", "curve", "_supervise"])
    ap.add_argument("name", nargs="?", default="r18_sgd_64", choices=list(RECIPES))
    ap.add_argument("--init", help="weights to start a new run from (when no checkpoint or packaged weights exist)")
    args = ap.parse_args()
    if args.action == "start":
        start(args.name, args.init)
    elif args.action == "_supervise":
        supervise(args.name)
    elif args.action == "status":
        status(args.name)
    elif args.action == "package":
        package(args.name)
    elif args.action == "stop":
        stop(args.name)
    else:
        curve(args.name)


if __name__ == "__main__":
    main()
