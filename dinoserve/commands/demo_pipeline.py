"""The whole product on one machine: adapt the shipped model (or train, or take weights),
evaluate, export, index, search; the shell layer's demo pipeline.

``run_demo(DemoConfig(...))`` runs the steps in order and records each finished one in
``<out>/demo.json``; a second run reuses every step whose inputs have not changed (same
data, recipe and weights), so only what is missing or stale is redone. ``fresh=True``
redoes everything.

By default the demo starts from the model this project trained and ships under
``weights/`` and fine-tunes it on the given images for ``minutes`` (showing training).
k-NN compares the shipped model, the fine-tuned one and raw pixels side by side, and the
demo serves the fine-tuned model only when it is not worse than the shipped one. With
``from_scratch`` it trains from random initialisation instead (the ``cpu_small`` preset,
its schedules fitted to the time limit).

Default data is openclipart from Debian (``apt-get install -y openclipart-png``) with the
fixed k-NN protocol in ``data/openclipart_knn.csv``: the model trains on ``knn_train`` +
``pool``, k-NN uses ``knn_train`` as the bank and ``knn_val`` as queries, and the index
holds every image of the list.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from dinoserve.atomic import atomic_write_text
from dinoserve.errors import ConfigError, DataError, WeightsError

REPO_ROOT = Path(__file__).resolve().parents[2]
OPENCLIPART_CSV = REPO_ROOT / "data" / "openclipart_knn.csv"
OPENCLIPART_ROOT = Path("/usr/share/openclipart/png")

#: The model this project trained on openclipart and ships (fp16 safetensors) with its
#: record: the command that made it, its k-NN top-1 and its training options.
SHIPPED_WEIGHTS = REPO_ROOT / "weights" / "dinoserve_resnet18_openclipart.safetensors"

#: Evaluation/serving size of a model trained from scratch by the demo: cpu_small's global
#: crop. After 2 epochs its k-NN top-1 was 45.5 % read at 64 px and 41.7 % at 96 px
#: (benchmarks/results/recipe_curves.json).
SCRATCH_IMAGE_SIZE = 64


@dataclass
class DemoConfig:
    """Options of ``dinoserve demo``; ``None`` means "the demo's default"."""

    data: str | None = None  # folder or CSV; None = openclipart
    out: str = "demo-run"
    repo: str = "model_repository"
    name: str = "dino_demo"
    minutes: float = 6.0  # fine-tuning (or from-scratch) budget; 0 = serve the shipped model as it is
    weights: str | None = None  # skip training and use these
    from_scratch: bool = False
    shipped: str = str(SHIPPED_WEIGHTS)
    arch: str | None = None
    image_size: int | None = None  # evaluation/serving size; None = the model's own
    fresh: bool = False
    examples: int = 3


@dataclass
class DemoData:
    source: str  # folder or CSV the index holds
    train_source: str  # folder or CSV to train on (never the k-NN queries)
    train_splits: tuple[str, ...] | None
    knn_data: str | None  # labelled set, or None when the data has no labels
    root: str | None


@dataclass
class Candidate:
    """A model the demo could serve."""

    label: str  # "shipped", "fine-tuned", "from scratch" or "--weights"
    weights: str
    arch: str | None
    image_size: int
    knn_top1: float | None = None  # the fixed split: what the serving rule compares
    fit: str = "crop"  # how images are fitted into its input (images.fit_image), as trained
    knn_loo: float | None = None  # leave-one-out over every labelled image (about half the error)


@dataclass
class DemoResult:
    """Every artefact and number of a demo run."""

    out: str
    served: str  # the weights exported, indexed and served
    why_served: str
    weights_sha256: str
    model_dir: str
    index: str
    knn: dict[str, float | None] = field(default_factory=dict)  # label -> top-1, raw pixels included
    examples: list[dict[str, Any]] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    knn_loo: dict[str, float | None] = field(default_factory=dict)  # the same, leave-one-out


Echo = Callable[[str], None]


# --------------------------------------------------------------------------------------
# State: which steps are done, for which inputs
# --------------------------------------------------------------------------------------


class DemoState:
    """``<out>/demo.json``: step name -> {"key": inputs fingerprint, ...outputs}."""

    def __init__(self, out: Path, fresh: bool):
        self.path = out / "demo.json"
        self.steps: dict[str, dict[str, Any]] = {}
        if self.path.is_file() and not fresh:
            self.steps = json.loads(self.path.read_text())

    def done(self, step: str, key: str) -> dict[str, Any] | None:
        entry = self.steps.get(step)
        return entry if entry and entry.get("key") == key else None

    def record(self, step: str, key: str, **outputs: Any) -> None:
        self.steps[step] = {"key": key, **outputs}
        atomic_write_text(self.path, json.dumps(self.steps, indent=2))


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------


def resolve_data(data: str | None) -> DemoData:
    """The training/index source and the labelled k-NN set for ``--data`` (None = openclipart)."""
    if data is None:
        if not OPENCLIPART_ROOT.is_dir():
            raise DataError(
                f"{OPENCLIPART_ROOT}: openclipart is not installed. Run `apt-get install -y "
                "openclipart-png` (after `apt-get update`), or pass --data with your own image folder."
            )
        csv = str(OPENCLIPART_CSV)
        return DemoData(csv, csv, ("knn_train", "pool"), csv, str(OPENCLIPART_ROOT))
    path = Path(data)
    if not path.exists():
        raise DataError(f"{data}: no such folder or file list; --data takes an image folder or a CSV")
    if path.suffix == ".csv":
        from dinoserve.filelist import read_file_list

        splits = {e.split for e in read_file_list(path)}
        if {"knn_train", "knn_val"} <= splits:  # the protocol's layout: never train on knn_val
            return DemoData(str(path), str(path), tuple(sorted(splits - {"knn_val"})), str(path), None)
        return DemoData(str(path), str(path), None, None, None)
    if (path / "train").is_dir() and (path / "val").is_dir():  # labelled folder: train on train/
        return DemoData(str(path), str(path / "train"), None, str(path), None)
    return DemoData(str(path), str(path), None, None, None)


#: Training options a shipped model's record carries that fine-tuning must keep: they
#: define the network and the crops it was trained on.
KEPT_FOR_FINETUNING = ("arch", "patch_size", "img_size", "depth", "out_dim", "hidden_dim", "bottleneck_dim",
                       "head_layers", "use_bn_in_head", "norm_last_layer", "global_crop_size", "global_crop_scale",
                       "local_crops", "local_crop_size", "local_crop_scale", "store_size", "fit")


def shipped_record(weights: str | Path) -> dict[str, Any]:
    """The record beside a shipped weights file (``<name>.json``), after checking that the
    file is there and whole; a one-line error naming the file and the way out otherwise."""
    path = Path(weights)
    record_path = path.with_suffix(".json")
    way_out = "pass --from-scratch to train from random initialisation, or --weights PATH for other weights"
    if not path.is_file() or not record_path.is_file():
        missing = path if not path.is_file() else record_path
        raise WeightsError(f"{missing}: the shipped model is missing (a clone of the repository has it under "
                           f"weights/); {way_out}")
    try:
        record = json.loads(record_path.read_text())
        expected = record["file_sha256"]
    except (ValueError, KeyError) as e:
        raise WeightsError(f"{record_path}: not a shipped-model record ({e}); {way_out}") from None
    from dinoserve.models import file_sha256

    if file_sha256(path) != expected:
        raise WeightsError(f"{path}: damaged or replaced (its sha256 is not the one in {record_path.name}); "
                           f"restore it with `git checkout -- {path.name}` or {way_out}")
    return record


def _train(cfg: DemoConfig, d: DemoData, out: Path, state: DemoState, echo: Echo) -> tuple[list[Candidate], bool]:
    """The models the demo can serve, and whether training was reused."""
    if cfg.weights:
        echo(f"[1/5] train: skipped, using --weights {cfg.weights}")
        return [Candidate("--weights", cfg.weights, cfg.arch, cfg.image_size or SCRATCH_IMAGE_SIZE)], True
    from dinoserve.training import make_config
    from dinoserve.training.data import find_images

    base: dict[str, Any] = dict(data=d.train_source, split=d.train_splits, data_root=d.root, out=str(out / "train"),
                                time_limit=cfg.minutes, progress=True, save_every=50)
    n_images = len(find_images(d.train_source, d.train_splits, d.root))
    if n_images < 2 * 64:  # small folders: several steps per epoch rather than no full batch
        base["batch_size"] = max(2, n_images // 4)
    if cfg.from_scratch:
        echo(f"[1/5] train: from scratch on {_where(d)} for at most {cfg.minutes:g} min")
        tcfg = make_config("cpu_small", **base, **({"arch": cfg.arch} if cfg.arch else {}))
        trained = Candidate("from scratch", str(out / "train" / "checkpoint.pth"), None,
                            cfg.image_size or SCRATCH_IMAGE_SIZE)
        return [trained], _run_training(tcfg, state, echo)
    record = shipped_record(cfg.shipped)
    size = cfg.image_size or int(record["image_size"])
    fit = record["train_args"].get("fit", "crop")
    shipped = Candidate("shipped", cfg.shipped, record["arch"], size, fit=fit)
    if cfg.minutes <= 0:
        echo(f"[1/5] train: none (--minutes 0); serving the shipped model {Path(cfg.shipped).name}")
        return [shipped], True
    echo(f"[1/5] train: fine-tuning the shipped model {Path(cfg.shipped).name} "
         f"(k-NN {record['knn_top1']:.1f} % on openclipart) on {_where(d)} for at most {cfg.minutes:g} min")
    kept = {k: record["train_args"][k] for k in KEPT_FOR_FINETUNING if k in record["train_args"]}
    tcfg = make_config("finetune", **base, **kept, pretrained=cfg.shipped)
    tuned = Candidate("fine-tuned", str(out / "train" / "checkpoint.pth"), None, size, fit=fit)
    return [shipped, tuned], _run_training(tcfg, state, echo)


def _where(d: DemoData) -> str:
    return d.train_source + (f" (splits {', '.join(d.train_splits)})" if d.train_splits else "")


def _run_training(tcfg: Any, state: DemoState, echo: Echo) -> bool:
    """Train as ``tcfg`` says unless the same run is done already; True when reused."""
    from dinoserve.training import train

    key = _fingerprint(tcfg.to_dict())
    ckpt = Path(tcfg.out) / "checkpoint.pth"
    if (entry := state.done("train", key)) and ckpt.is_file():
        echo(f"      reusing {ckpt} (loss {entry['final_loss']:.3f}; --fresh retrains)")
        return True
    if ckpt.exists():  # an older run with other settings: this one replaces it
        import shutil

        shutil.rmtree(ckpt.parent)
    result = train(tcfg)
    echo(f"      loss {result.final_loss:.3f} after {result.steps} steps in {result.epochs_done} epoch(s), "
         f"{result.images_per_second:.0f} img/s, {result.skipped['count']} unreadable images left out")
    state.record("train", key, checkpoint=result.checkpoint, final_loss=result.final_loss)
    return False


def _knn(d: DemoData, candidates: list[Candidate], state: DemoState, echo: Echo) -> dict[str, float] | None:
    """k-NN top-1 of every candidate next to raw pixels at the same size, on both protocols;
    returns raw pixels' (and the query counts)."""
    if d.knn_data is None:
        echo("[2/5] k-NN: skipped (the data has no labels: give a CSV with knn_train/knn_val splits "
             "or a folder with train/ and val/ class folders)")
        return None
    from dinoserve.models import file_sha256, load_backbone, resolve_source
    from dinoserve.training.knn import evaluate_knn_protocols, prepare_knn_set

    echo(f"[2/5] k-NN: DINO protocol (k=20, T=0.07) on {d.knn_data}: the fixed split and leave-one-out, "
         f"± one standard error")
    raw: dict[str, float] | None = None
    sets: dict[int, Any] = {}
    for c in candidates:
        key = _fingerprint(file_sha256(resolve_source(c.weights)), d.knn_data, c.image_size, c.fit)
        entry = state.done(f"knn {c.label}", key)
        if entry and "raw" in entry:
            c.knn_top1, c.knn_loo, raw = entry["top1"], entry["loo"], entry["raw"]
        else:
            if (c.image_size, c.fit) not in sets:
                sets[c.image_size, c.fit] = prepare_knn_set(d.knn_data, c.image_size, root=d.root, fit=c.fit)
            knn_set = sets[c.image_size, c.fit]
            ours = evaluate_knn_protocols(load_backbone(c.weights, c.arch).eval(), knn_set)
            pixels = evaluate_knn_protocols(None, knn_set)
            c.knn_top1, c.knn_loo = ours["split"].top1, ours["loo"].top1
            raw = {"split": pixels["split"].top1, "loo": pixels["loo"].top1,
                   "n_split": ours["split"].n_query, "n_loo": ours["loo"].n_query}
            state.record(f"knn {c.label}", key, top1=c.knn_top1, loo=c.knn_loo, raw=raw)
        echo(f"      {c.label:>12}: {_both(c.knn_top1, c.knn_loo, raw)}  ({c.image_size} px, {c.fit})")
    echo(f"      {'raw pixels':>12}: {_both(raw['split'], raw['loo'], raw)}  (same size and fit)")
    return raw


def _both(split: float, loo: float, n: dict) -> str:
    from dinoserve.training.knn import standard_error

    return (f"split {split:5.1f} ± {standard_error(split, n['n_split']):.1f} %, "
            f"leave-one-out {loo:5.1f} ± {standard_error(loo, n['n_loo']):.1f} %")


def choose(candidates: list[Candidate]) -> tuple[Candidate, str]:
    """The model to serve: the trained one, unless it scores below the shipped one."""
    chosen = candidates[-1]
    if len(candidates) == 1:
        return chosen, f"the {chosen.label} model"
    shipped, tuned = candidates[0], candidates[-1]
    if shipped.knn_top1 is None or tuned.knn_top1 is None:
        return tuned, "the fine-tuned model (no labels to compare it with the shipped one)"
    if tuned.knn_top1 < shipped.knn_top1:
        return shipped, (f"the shipped model: fine-tuning lowered k-NN top-1 from {shipped.knn_top1:.1f} % to "
                         f"{tuned.knn_top1:.1f} %, so the fine-tuned model is not served")
    return tuned, f"the fine-tuned model (k-NN {tuned.knn_top1:.1f} % >= shipped {shipped.knn_top1:.1f} %)"


def _export(cfg: DemoConfig, served: Candidate, state: DemoState, echo: Echo) -> tuple[str, str, bool]:
    from dinoserve.models import file_sha256, resolve_source
    from dinoserve.repository import latest_version, read_model_config

    sha = file_sha256(resolve_source(served.weights))
    model_dir = Path(cfg.repo) / cfg.name
    key = _fingerprint(sha, served.image_size, served.arch, served.fit)
    version = latest_version(model_dir) if model_dir.is_dir() else None
    if state.done("export", key) and version is not None and read_model_config(model_dir).card.weights_sha256 == sha:
        echo(f"[3/5] export: reusing {model_dir} version {version}")
        return str(model_dir), sha, True
    from dinoserve.export import export_onnx

    echo(f"[3/5] export: the {served.label} model as ONNX into {model_dir} at {served.image_size} px")
    result = export_onnx(served.weights, name=cfg.name, arch=served.arch, repo=cfg.repo, image_size=served.image_size,
                         fit=served.fit)
    echo(f"      version {result.version}, onnxruntime vs PyTorch max abs diff {result.max_abs_diff:.2e}")
    state.record("export", key, model_dir=str(result.model_dir), version=result.version)
    return str(result.model_dir), sha, False


def _index(cfg: DemoConfig, d: DemoData, out: Path, sha: str, client, state: DemoState, echo: Echo) -> tuple[str, bool]:
    from dinoserve.index import build_index, update_index

    path = out / "demo.index"
    key = _fingerprint(sha, d.source)
    if state.done("index", key) and path.exists():
        report = update_index(path, client, progress=False)  # cheap when nothing changed
        echo(f"[4/5] index: reusing {path} ({_report_line(report)})")
        return str(path), True
    echo(f"[4/5] index: embedding every image of {d.source}")
    report = build_index(d.source, path, client, root=d.root)
    echo(f"      {_report_line(report)}")
    state.record("index", key, index=str(path))
    return str(path), False


def _report_line(report: Any) -> str:
    return (f"{report.count} images: {report.embedded} embedded, {report.reused} reused, "
            f"{report.removed} removed, {len(report.skipped)} unreadable skipped, {report.seconds:.1f} s")


def _examples(cfg: DemoConfig, d: DemoData, client, index_path: str, echo: Echo) -> list[dict[str, Any]]:
    from dinoserve.index import EmbeddingIndex

    index = EmbeddingIndex.load(index_path)
    queries = _example_queries(d, index, cfg.examples)
    echo(f"[5/5] search: {len(queries)} example queries, top 3 of {len(index)} images")
    hits = client.search(queries, index=index, k=4)
    rows = []
    for query, found in zip(queries, hits):
        found = [h for h in found if Path(h.path) != Path(query)][:3]
        echo(f"      {_short(query)}")
        for h in found:
            echo(f"        {h.score:.3f}  {_short(h.path)}")
        rows.append({"query": query, "hits": [{"path": h.path, "score": h.score} for h in found]})
    return rows


def _example_queries(d: DemoData, index: Any, n: int) -> list[str]:
    if d.knn_data and d.source.endswith(".csv"):
        from dinoserve.filelist import read_file_list

        indexed = set(index.paths)  # readable images only: the index skipped the rest
        by_class: dict[str, str] = {}
        for e in read_file_list(d.knn_data, ("knn_val",), d.root):
            if str(e.path) in indexed:
                by_class.setdefault(e.category or "", str(e.path))
        picks = list(by_class.values())
    else:
        picks = list(index.paths)
    step = max(1, len(picks) // max(n, 1))
    return picks[::step][:n]


def _short(path: str) -> str:
    p = Path(path)
    return str(p.relative_to(OPENCLIPART_ROOT)) if p.is_relative_to(OPENCLIPART_ROOT) else str(p)


# --------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig, echo: Echo = print) -> DemoResult:
    """Adapt the shipped model (or train, or take ``cfg.weights``), evaluate, export the
    model worth serving, index and search; reuse what is done."""
    if cfg.minutes < 0:
        raise ConfigError(f"--minutes must not be negative, got {cfg.minutes}")
    if cfg.minutes == 0 and cfg.from_scratch:
        raise ConfigError("--from-scratch needs training time: give --minutes above 0")
    from dinoserve.client import Client

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state = DemoState(out, cfg.fresh)
    d = resolve_data(cfg.data)
    reused, seconds = [], {}

    def timed(step: str, fn: Callable[[], Any]) -> Any:
        start = time.monotonic()
        value = fn()
        seconds[step] = round(time.monotonic() - start, 1)
        return value

    candidates, r = timed("train", lambda: _train(cfg, d, out, state, echo))
    reused += ["train"] if r and not cfg.weights and cfg.minutes > 0 else []
    raw = timed("knn", lambda: _knn(d, candidates, state, echo))
    served, why = choose(candidates)
    echo(f"      serving {why}")
    model_dir, sha, r = timed("export", lambda: _export(cfg, served, state, echo))
    reused += ["export"] if r else []
    with Client(repo=cfg.repo, model=cfg.name) as client:
        index_path, r = timed("index", lambda: _index(cfg, d, out, sha, client, state, echo))
        reused += ["index"] if r else []
        examples = timed("search", lambda: _examples(cfg, d, client, index_path, echo))
    knn = {c.label: c.knn_top1 for c in candidates}
    knn_loo = {c.label: c.knn_loo for c in candidates}
    if raw is not None:
        knn["raw pixels"], knn_loo["raw pixels"] = raw["split"], raw["loo"]
    result = DemoResult(str(out), served.weights, why, sha, model_dir, index_path, knn, examples, reused, seconds,
                        knn_loo)
    atomic_write_text(out / "result.json", json.dumps(asdict(result), indent=2))
    return result
