"""Embed and index large image collections on Ray Data: many cores, machines and Triton replicas.

>>> from dinoserve.ray_engine import RayOptions, build_index_ray, embed_paths
>>> report = build_index_ray("photos/", "photos.index", RayOptions(actors=4))           # local Ray
>>> report = build_index_ray("list.csv", "bank.index", RayOptions(url="grpc://triton:8001",
...                          address="ray://head:10001", actors=16))                      # a cluster

The pipeline, one row per shard of ``shard_size`` files (:mod:`dinoserve.shard_store`):

1. the driver lists the source (the folder walk or CSV list the in-process index uses) and
   skips shards already written by an earlier, interrupted run;
2. CPU tasks read each file, hash it (:func:`dinoserve.index.read_item`) and decode and
   preprocess it with :func:`dinoserve.images.preprocess_batch`, the project's one
   preprocessing; unreadable and corrupt files are skipped with the in-process messages;
3. an actor pool embeds the uint8 pixels; each actor holds one
   :class:`~dinoserve.client.Client`, in-process onnxruntime or a Triton client (``url``);
4. the driver writes each embedded shard whole, then builds the faiss index from all shards
   with :func:`dinoserve.index.build_index_from_embeddings` (same checks and atomic publish).

Ray restarts an actor that dies and retries the shard it held (Ray Data's actor pools
default to ``max_restarts=-1`` and ``max_task_retries=-1``: without limit), and a killed
decode task is retried like any Ray task; since a shard is written only once, whole, by the
driver, a retried shard is neither lost nor duplicated. Ray is imported only here, and only when a job runs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dinoserve import shard_store
from dinoserve.errors import ConfigError, DataError, ServerUnavailableError
from dinoserve.images import IMAGE_EXTENSIONS, preprocess_batch
from dinoserve.model_info import ModelInfo

INSTALL_HINT = 'pip install "dinoserve[ray]"'
#: Seconds to wait for a cluster address to accept a connection.
CONNECT_TIMEOUT = 5.0


@dataclass
class RayOptions:
    """Where the job runs and how it embeds.

    ``url``/``repo``/``model``/``batch_size``/``timeout`` are the :class:`~dinoserve.client.Client`
    each actor builds. ``address``: a Ray cluster (``host:6379``, ``ray://host:10001`` or
    ``auto``); ``None`` uses ``RAY_ADDRESS`` when set, else starts a local Ray. ``actors``:
    embedding actors (default: half the cluster's CPUs, at least 1); ``actor_cpus``: CPUs
    reserved by each. ``shard_size``: files per shard (the unit of resume and of retry).
    ``hold_dir``: fault-injection hook for tests; see :func:`_hold`.
    """

    url: str | None = None
    repo: str | os.PathLike = "model_repository"
    model: str | None = None
    batch_size: int = 32
    timeout: float = 60.0
    address: str | None = None
    actors: int | None = None
    actor_cpus: float = 1.0
    shard_size: int = 1024
    progress: bool = True
    hold_dir: str | None = None
    runtime: str = "onnxruntime"  # in-process actors: onnxruntime or openvino

    def client_kwargs(self) -> dict:
        return {"url": self.url, "model": self.model, "repo": str(self.repo), "batch_size": self.batch_size,
                "timeout": self.timeout, "runtime": self.runtime}


@dataclass
class ShardRun:
    """The outcome of :func:`embed_paths`: rows and embeddings in file order, and what was done."""

    info: ModelInfo
    rows: list[dict]
    embeddings: np.ndarray
    skipped: list[tuple[str, str]]
    shards: int = 0
    shards_reused: int = 0
    images_embedded: int = 0
    images_reused: int = 0
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)


# --- Ray, imported lazily --------------------------------------------------------------------
def import_ray():
    """The ``ray`` module, or a one-line error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] extra: pyarrow, pandas)
    except ImportError as e:
        raise ConfigError(f"--engine ray needs Ray Data, which is not installed ({e}); "
                          f"install it with `{INSTALL_HINT}`") from None
    return ray


def probe_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Raise :class:`ServerUnavailableError` within ``timeout`` s if ``address`` accepts no connection.

    ``ray.init`` itself retries an unreachable cluster for a minute or more; this fails fast.
    """
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r}: use HOST:PORT (e.g. 10.0.0.5:6379), ray://HOST:10001 or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ServerUnavailableError(
            f"Ray cluster {address!r} does not answer ({e.strerror or e}); start it with `ray start --head`, "
            "check --ray-address / RAY_ADDRESS, or leave both out to run on a local Ray"
        ) from None


def connect(address: str | None = None) -> bool:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start a local one.

    Returns whether this call started Ray (so the caller shuts it down when done). A Ray
    already initialised in this process (a notebook, a test fixture) is used as it is.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    # "local" starts a new Ray: without it ray.init would join any Ray it finds on this machine.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        start_local()
        return True
    if address != "auto":
        probe_address(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=True, log_to_driver=True)
    except ConnectionError as e:
        raise ServerUnavailableError(f"cannot join Ray cluster {address!r} ({e}); "
                                     "check --ray-address / RAY_ADDRESS") from None
    return True


def start_local(attempts: int = 3, **init_kwargs) -> None:
    """Start a new local Ray in this process (``init_kwargs`` go to ``ray.init``, e.g. ``num_cpus``).

    Ray waits a fixed 30 s for its raylet to register; on a busy machine (2 shared cores
    running a test suite) that can run out, so the start is tried ``attempts`` times.
    """
    ray = import_ray()
    kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, **init_kwargs}
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", **kwargs)
            return
        except Exception as e:  # noqa: BLE001  ray.init raises a bare Exception when its node fails to start
            ray.shutdown()
            if "timed out during startup" not in str(e):
                raise
            if attempt == attempts:
                raise ServerUnavailableError(
                    f"a local Ray did not start in {attempts} tries ({str(e).splitlines()[0]}); the machine may be "
                    "overloaded; see /tmp/ray/session_latest/logs, or join a running cluster with --ray-address"
                ) from None


# --- the work of each stage, run in Ray workers ----------------------------------------------
def decode_shard(paths: Sequence[str], size: int, crop_pct: float, mode: str):
    """Read, decode and preprocess one shard's files: (uint8 pixels, rows, skipped) in file order.

    ``mode="index"`` reads and hashes each file as the in-process index does (rows with
    size, mtime and sha256); ``"embed"`` decodes the paths as ``Client.embed`` does. Either
    way the skip messages are the in-process path's, word for word.
    """
    from dinoserve.index import read_item, unreadable

    if mode == "embed":
        pixels, kept, bad = preprocess_batch(list(paths), size, crop_pct, on_error="skip")
        rows = [{"path": paths[k]} for k in kept]
        return pixels, rows, [(paths[pos], msg) for pos, msg in bad]
    rows, datas, names, skipped = [], [], [], []
    for p in paths:
        try:
            row, data = read_item(p)
        except OSError as e:
            skipped.append((p, unreadable(p, e)))
            continue
        rows.append(row)
        datas.append(data)
        names.append(p)
    pixels, kept, bad = preprocess_batch(datas, size, crop_pct, on_error="skip", names=names)
    skipped += [(names[pos], msg) for pos, msg in bad]
    order = {p: i for i, p in enumerate(paths)}
    skipped.sort(key=lambda s: order[s[0]])  # file order, as the in-process index lists them
    return pixels, [rows[k] for k in kept], skipped


def _decode_batch(batch: dict, size: int, crop_pct: float, mode: str) -> dict:
    """Ray Data task: one shard row in, its pixels (raw bytes), rows and skipped files out."""
    paths = json.loads(batch["paths"][0])
    pixels, rows, skipped = decode_shard(paths, size, crop_pct, mode)
    return {"shard": batch["shard"], "n": np.array([len(pixels)]),
            "pixels": np.array([pixels.tobytes()], dtype=object),
            "rows": np.array([json.dumps(rows)], dtype=object),
            "skipped": np.array([json.dumps(skipped)], dtype=object)}


def _hold(hold_dir: str, shard: int) -> None:
    """Fault-injection hook: announce ``started-<shard>-<pid>`` (holding this actor's pid), then
    wait until ``release`` exists. A test kills the announced process while it waits, so the
    kill lands mid-shard without racing the work."""
    d = Path(hold_dir)
    (d / f"started-{shard:06d}-{os.getpid()}").write_text(str(os.getpid()))
    deadline = time.monotonic() + 300
    while not (d / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


class _EmbedActor:
    """Ray Data actor: one Client (onnxruntime in-process, or Triton) embedding shard after shard."""

    def __init__(self, client_kwargs: dict, normalize: bool, hold_dir: str | None):
        from dinoserve.client import Client

        self.client = Client(**client_kwargs, concurrency=1)
        self.size = self.client.info.image_size
        self.normalize = normalize
        self.hold_dir = hold_dir

    def __call__(self, batch: dict) -> dict:
        shard, n = int(batch["shard"][0]), int(batch["n"][0])
        if self.hold_dir:
            _hold(self.hold_dir, shard)
        pixels = np.frombuffer(batch["pixels"][0], np.uint8).reshape(n, 3, self.size, self.size)
        emb = self.client.embed_pixels(pixels, normalize=self.normalize)
        return {"shard": batch["shard"], "rows": batch["rows"], "skipped": batch["skipped"],
                "dim": np.array([emb.shape[1]]), "embeddings": np.array([emb.tobytes()], dtype=object)}


# --- the driver ------------------------------------------------------------------------------
def model_info(options: RayOptions) -> ModelInfo:
    """The model the actors will run, checked here first (a wrong --model or --url fails fast)."""
    from dinoserve.client import Client

    with Client(**options.client_kwargs()) as client:
        return client.info


def embed_paths(paths: Sequence[str], shards_dir: str | os.PathLike, options: RayOptions, *,
                mode: str = "index", normalize: bool = True,
                on_shard: Callable[[int], None] | None = None) -> ShardRun:
    """Embed ``paths`` on Ray into the shard folder ``shards_dir``, resuming what is already there.

    Returns every shard's rows and embeddings in ``paths`` order. ``on_shard(i)`` is called
    after shard ``i`` is written (a test interrupts the job there, as Ctrl-C would).
    """
    if mode not in ("index", "embed"):
        raise ConfigError(f"mode must be 'index' or 'embed', got {mode!r}")
    t0 = time.perf_counter()
    ray = import_ray()  # before any work: a missing extra is a one-line error
    address = options.address or os.environ.get("RAY_ADDRESS")
    if address and address not in ("auto", "local") and not ray.is_initialized():
        probe_address(address)  # and an unreachable cluster too, before any file is written
    info = model_info(options)
    shards = shard_store.plan(paths, options.shard_size)
    run = ShardRun(info, [], np.zeros((0, info.embed_dim), np.float32), [], shards=len(shards))
    with shard_store.ShardStore(shards_dir, shard_store.job_record(info, mode, normalize), info) as store:
        store.remove_beyond(len(shards))
        keys = [shard_store.shard_key(s) for s in shards]
        todo = [i for i in range(len(shards)) if not store.is_done(i, keys[i])]
        run.shards_reused = len(shards) - len(todo)
        if todo:
            run.images_embedded = _run_pipeline(store, shards, keys, todo, info, options, mode, normalize, on_shard)
        rows, vectors = [], []
        for i in range(len(shards)):
            r, e, s = store.read(i)
            rows += r
            vectors.append(e)
            run.skipped += s
    run.rows = rows
    if vectors:
        run.embeddings = np.concatenate(vectors).astype(np.float32, copy=False)
    run.images_reused = len(rows) - run.images_embedded
    run.seconds = time.perf_counter() - t0
    return run


def _run_pipeline(store: shard_store.ShardStore, shards: list[list[str]], keys: list[str], todo: list[int],
                  info: ModelInfo, options: RayOptions, mode: str, normalize: bool,
                  on_shard: Callable[[int], None] | None) -> int:
    """Embed the ``todo`` shards on Ray and write each one as it arrives; the images embedded."""
    started = connect(options.address)
    ray = import_ray()
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # our own bar counts images; Ray's counts blocks
        actors = options.actors or max(1, int(ray.cluster_resources().get("CPU", 2)) // 2)
        ds = ray.data.from_items([{"shard": i, "paths": json.dumps(shards[i])} for i in todo],
                                 override_num_blocks=len(todo))  # one block per shard: decoded in parallel
        # Decode tasks reserve the memory of a shard's pixels twice (numpy, Arrow) plus a worker's
        # own (measured: 112 MiB with numpy, PIL and dinoserve imported), so a node runs
        # only as many as it can hold. Unlike the actors' arguments, this also keeps them an operator
        # of their own: Ray Data fuses a task map into the next actor map when their remote arguments
        # agree, and then the actors would decode too, so decoding could no longer scale with cores
        # apart from inference.
        shard_bytes = 2 * options.shard_size * 3 * info.image_size ** 2 + 160 * 2**20
        ds = ds.map_batches(_decode_batch, batch_size=1, num_cpus=1, memory=shard_bytes,
                            fn_kwargs={"size": info.image_size, "crop_pct": info.crop_pct, "mode": mode})
        ds = ds.map_batches(_EmbedActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                            num_cpus=options.actor_cpus,
                            fn_constructor_kwargs={"client_kwargs": options.client_kwargs(),
                                                   "normalize": normalize, "hold_dir": options.hold_dir})
        bar = _progress_bar(sum(len(shards[i]) for i in todo), options.progress)
        embedded = 0
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1):
            i = int(batch["shard"][0])
            rows = json.loads(batch["rows"][0])
            emb = np.frombuffer(batch["embeddings"][0], np.float32).reshape(len(rows), int(batch["dim"][0]))
            skipped = [tuple(s) for s in json.loads(batch["skipped"][0])]
            store.write(i, keys[i], rows, emb, skipped)
            embedded += len(rows)
            if bar is not None:
                bar.update(len(shards[i]))
            if on_shard is not None:
                on_shard(i)
        if bar is not None:
            bar.close()
        return embedded
    finally:
        if started:
            ray.shutdown()


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="embed (ray)", unit="img", dynamic_ncols=True)


# --- the two jobs ----------------------------------------------------------------------------
def default_shards_dir(out: str | os.PathLike) -> Path:
    """Where a job writing ``out`` keeps its shards unless told: ``<out>.shards`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".shards")


def build_index_ray(source: str | os.PathLike, out: str | os.PathLike, options: RayOptions, *,
                    kind: str = "auto", splits: Sequence[str] | None = None, root: str | os.PathLike | None = None,
                    kind_params: dict | None = None, shards_dir: str | os.PathLike | None = None,
                    keep_shards: bool = False, on_shard: Callable[[int], None] | None = None,
                    recall: float | None = None):
    """:func:`dinoserve.index.build_index` on Ray: the same files, rows, skipped list and index.

    Shards go to ``shards_dir`` (default ``<out>.shards``); a rerun after a crash or Ctrl-C
    embeds only the missing shards. They are removed once the index is published, unless
    ``keep_shards``. ``kind="auto"`` is :func:`dinoserve.index_kinds.resolve`'s choice (exact
    ``flat`` below :data:`~dinoserve.index_kinds.AUTO_IVF_FROM` images); ``recall`` a recall@10
    target, as for :func:`~dinoserve.index.build_index`.
    """
    from dinoserve.index import build_index_from_embeddings, scan, source_spec

    import_ray()
    spec = source_spec(source, splits, root)
    shards_dir = Path(shards_dir) if shards_dir else default_shards_dir(out)
    paths = scan(spec, exclude=Path(out))
    if not paths:
        raise DataError(f"{source}: no image files found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    run = embed_paths(paths, shards_dir, options, mode="index", on_shard=on_shard)
    report = build_index_from_embeddings(out, spec, run.info, run.rows, run.embeddings, run.skipped,
                                         kind=kind, kind_params=kind_params, recall=recall)
    report.embedded, report.reused = run.images_embedded, run.images_reused
    report.seconds = run.seconds + report.seconds
    if not keep_shards:
        _remove_shards(shards_dir)
    return report


def _remove_shards(shards_dir: Path) -> None:
    import shutil

    shutil.rmtree(shards_dir, ignore_errors=True)


def expand_sources(images: Sequence[str]) -> tuple[list[str], dict | None]:
    """``dinoserve embed`` inputs as a file list: one folder or CSV is expanded (sorted, as the
    index lists it); anything else is taken as the image paths themselves."""
    from dinoserve.index import scan, source_spec

    if len(images) == 1 and (Path(images[0]).is_dir() or Path(images[0]).suffix.lower() == ".csv"):
        spec = source_spec(images[0])
        return scan(spec), spec
    return list(images), None


__all__ = ["RayOptions", "ShardRun", "build_index_ray", "embed_paths", "expand_sources", "connect",
           "probe_address", "import_ray", "decode_shard", "default_shards_dir", "INSTALL_HINT"]
