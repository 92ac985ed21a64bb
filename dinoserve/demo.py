"""The whole product on one machine: train (or take weights), export, index, evaluate, serve.

``run_demo(DemoConfig(...))`` runs the steps in order and records each finished one in
``<out>/demo.json``; a second run reuses every step whose inputs have not changed (same
data, recipe and weights), so only what is missing or stale is redone. ``fresh=True``
redoes everything.

Default data is openclipart from Debian (``apt-get install -y openclipart-png``) with the
fixed k-NN protocol in ``data/openclipart_knn.csv``: the model trains on ``knn_train`` +
``pool``, k-NN uses ``knn_train`` as the bank and ``knn_val`` as queries, and the index
holds every image of the list.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from dinoserve.atomic import atomic_write_bytes, atomic_write_text
from dinoserve.errors import ConfigError, DataError, ImageError
from dinoserve.images import load_image

OPENCLIPART_CSV = Path(__file__).resolve().parents[1] / "data" / "openclipart_knn.csv"
OPENCLIPART_ROOT = Path("/usr/share/openclipart/png")

#: Reference k-NN top-1 on the openclipart protocol (shared data README): what a trained
#: model has to beat to be worth anything.
RAW_PIXELS_TOP1 = 55.2

#: Images per second of the cpu_small preset on this 2-core machine, fp32, training on the
#: demo's downscaled copy (44 measured on a quiet machine; 5-20 under other jobs' load). Used only to
#: size the epoch count so the schedules roughly fit --minutes; the time limit is the hard
#: stop, so a slower machine ends with the learning rate not fully annealed.
CPU_SMALL_IMAGES_PER_SECOND = 40.0

#: Longest side of the training copies the demo makes (crops are 64 and 32 px).
THUMBNAIL_SIDE = 160


@dataclass
class DemoConfig:
    """Options of ``dinoserve demo``; ``None`` means "the demo's default"."""

    data: str | None = None  # folder or CSV; None = openclipart
    out: str = "demo-run"
    repo: str = "model_repository"
    name: str = "dino_demo"
    minutes: float = 6.0
    weights: str | None = None  # skip training and use these
    arch: str | None = None
    checkpoint_key: str = "teacher"
    preset: str = "cpu_small"
    image_size: int = 96  # evaluation/serving size of the exported model
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
class DemoResult:
    """Every artefact and number of a demo run."""

    out: str
    checkpoint: str
    weights_sha256: str
    model_dir: str
    index: str
    knn_top1: float | None = None
    raw_pixels_top1: float | None = None
    examples: list[dict[str, Any]] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


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


def _thumbnails(d: DemoData, out: Path, echo: Echo) -> tuple[Path, int]:
    """A downscaled copy of the training images, made once and reused.

    Clip art comes as PNGs of up to 89 megapixels, and PNG cannot be decoded at a reduced
    size: decoding the originals every epoch made a training step take ~90 s here. Crops of
    64/32 px need no more than THUMBNAIL_SIDE pixels; unreadable images are left out (and
    counted), as training would skip them anyway.
    """
    from concurrent.futures import ThreadPoolExecutor

    from dinoserve.training.data import find_images

    sources = find_images(d.train_source, d.train_splits, d.root)
    folder = out / "thumbnails"
    done = folder / ".complete"
    if done.is_file() and int(done.read_text() or -1) == len(sources):
        return folder, len(list(folder.glob("*.png")))

    def shrink(item: tuple[int, Path]) -> bool:
        i, src = item
        try:
            img = load_image(src)
        except ImageError:
            return False
        img.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        atomic_write_bytes(folder / f"{i:06d}.png", buf.getvalue())
        return True

    echo(f"      downscaling {len(sources)} training images to at most {THUMBNAIL_SIDE} px (once)")
    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        kept = sum(pool.map(shrink, enumerate(sources)))
    done.write_text(str(len(sources)))
    echo(f"      {kept} thumbnails, {len(sources) - kept} unreadable images left out")
    return folder, kept


def _train(cfg: DemoConfig, d: DemoData, out: Path, state: DemoState, echo: Echo) -> tuple[str, bool]:
    if cfg.weights:
        echo(f"[1/5] train: skipped, using --weights {cfg.weights}")
        return cfg.weights, True
    from dinoserve.training import make_config, train

    echo(f"[1/5] train: {d.train_source}" + (f" (splits {', '.join(d.train_splits)})" if d.train_splits else ""))
    data, n_images = _thumbnails(d, out, echo)
    epochs = _epochs_for(cfg.minutes, n_images)
    # A run of a few epochs warms up for a tenth of it and never freezes the last layer
    # (freezing for one epoch would freeze it for the whole of a one-epoch run).
    overrides: dict[str, Any] = dict(data=str(data), out=str(out / "train"),
                                     epochs=epochs, time_limit=cfg.minutes, progress=True, save_every=50,
                                     warmup_epochs=0.1 * epochs, freeze_last_layer=0)
    if n_images < 2 * 64:  # small folders: keep several steps per epoch rather than failing
        overrides["batch_size"] = max(2, n_images // 4)
    if cfg.arch:
        overrides["arch"] = cfg.arch
    tcfg = make_config(cfg.preset, **overrides)
    key = _fingerprint(tcfg.to_dict())
    ckpt = out / "train" / "checkpoint.pth"
    if (entry := state.done("train", key)) and ckpt.is_file():
        echo(f"      reusing {ckpt} (loss {entry['final_loss']:.3f}; --fresh retrains)")
        return str(ckpt), True
    echo(f"      {tcfg.arch} with the {cfg.preset} preset for at most {cfg.minutes:g} min "
         f"({epochs} epochs of {n_images} images planned)")
    result = train(tcfg)
    skipped = result.skipped.get("count", 0) if isinstance(result.skipped, dict) else 0
    echo(f"      loss {result.final_loss:.3f} after {result.steps} steps, {result.images_per_second:.0f} img/s, "
         f"{skipped} unreadable images skipped")
    state.record("train", key, checkpoint=result.checkpoint, final_loss=result.final_loss)
    return result.checkpoint, False


def _epochs_for(minutes: float, n_images: int) -> int:
    return max(1, round(minutes * 60 * CPU_SMALL_IMAGES_PER_SECOND / max(n_images, 1)))


def _export(cfg: DemoConfig, weights: str, state: DemoState, echo: Echo) -> tuple[str, str, bool]:
    from dinoserve.models import file_sha256, resolve_source
    from dinoserve.repository import latest_version, read_model_config

    sha = file_sha256(resolve_source(weights))
    model_dir = Path(cfg.repo) / cfg.name
    key = _fingerprint(sha, cfg.image_size, cfg.arch, cfg.checkpoint_key)
    version = latest_version(model_dir) if model_dir.is_dir() else None
    if state.done("export", key) and version is not None:
        if read_model_config(model_dir).parameters.get("weights_sha256") == sha:
            echo(f"[2/5] export: reusing {model_dir} version {version}")
            return str(model_dir), sha, True
    from dinoserve.export import export_onnx

    echo(f"[2/5] export: ONNX into {model_dir} at {cfg.image_size} px")
    result = export_onnx(weights, name=cfg.name, arch=cfg.arch, repo=cfg.repo, image_size=cfg.image_size,
                         checkpoint_key=cfg.checkpoint_key)
    echo(f"      version {result.version}, onnxruntime vs PyTorch max abs diff {result.max_abs_diff:.2e}")
    state.record("export", key, model_dir=str(result.model_dir), version=result.version)
    return str(result.model_dir), sha, False


def _index(cfg: DemoConfig, d: DemoData, out: Path, sha: str, client, state: DemoState, echo: Echo) -> tuple[str, bool]:
    from dinoserve.index import build_index, update_index

    path = out / "demo.index"
    key = _fingerprint(sha, d.source)
    if state.done("index", key) and path.exists():
        report = update_index(path, client, progress=False)  # cheap when nothing changed
        echo(f"[3/5] index: reusing {path} ({_report_line(report)})")
        return str(path), True
    echo(f"[3/5] index: embedding every image of {d.source}")
    report = build_index(d.source, path, client, root=d.root)
    echo(f"      {_report_line(report)}")
    state.record("index", key, index=str(path))
    return str(path), False


def _report_line(report: Any) -> str:
    return (f"{report.count} images: {report.embedded} embedded, {report.reused} reused, "
            f"{report.removed} removed, {len(report.skipped)} unreadable skipped, {report.seconds:.1f} s")


def _knn(cfg: DemoConfig, d: DemoData, weights: str, sha: str, state: DemoState, echo: Echo) -> tuple[float | None, float | None]:
    if d.knn_data is None:
        echo("[4/5] k-NN: skipped (the data has no labels: give a CSV with knn_train/knn_val splits "
             "or a folder with train/ and val/ class folders)")
        return None, None
    key = _fingerprint(sha, d.knn_data, cfg.image_size)
    if entry := state.done("knn", key):
        echo(f"[4/5] k-NN: top-1 {entry['top1']:.1f} % (raw pixels {entry['raw_top1']:.1f} %), reused")
        return entry["top1"], entry["raw_top1"]
    from dinoserve.models import load_backbone
    from dinoserve.training.knn import evaluate_knn_set, prepare_knn_set

    echo(f"[4/5] k-NN: DINO protocol (k=20, T=0.07) on {d.knn_data} at {cfg.image_size} px")
    knn_set = prepare_knn_set(d.knn_data, cfg.image_size, root=d.root)
    model = load_backbone(weights, cfg.arch, checkpoint_key=cfg.checkpoint_key).eval()
    ours = evaluate_knn_set(model, knn_set)
    raw = evaluate_knn_set(None, knn_set)
    echo(f"      top-1 {ours.top1:.1f} % (raw pixels {raw.top1:.1f} %; shared reference for raw pixels "
         f"{RAW_PIXELS_TOP1} %)")
    state.record("knn", key, top1=ours.top1, raw_top1=raw.top1)
    return ours.top1, raw.top1


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
    """Train (or take ``cfg.weights``), export, index, evaluate and search; reuse what is done."""
    if cfg.minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {cfg.minutes}")
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

    weights, r = timed("train", lambda: _train(cfg, d, out, state, echo))
    reused += ["train"] if r and not cfg.weights else []
    model_dir, sha, r = timed("export", lambda: _export(cfg, weights, state, echo))
    reused += ["export"] if r else []
    client = Client(repo=cfg.repo, model=cfg.name)
    index_path, r = timed("index", lambda: _index(cfg, d, out, sha, client, state, echo))
    reused += ["index"] if r else []
    top1, raw = timed("knn", lambda: _knn(cfg, d, weights, sha, state, echo))
    examples = timed("search", lambda: _examples(cfg, d, client, index_path, echo))
    result = DemoResult(str(out), str(weights), sha, model_dir, index_path, top1, raw, examples, reused, seconds)
    atomic_write_text(out / "result.json", json.dumps(asdict(result), indent=2))
    return result
