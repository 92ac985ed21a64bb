"""Reliability: the fault set, bad inputs and a load test, on real components, in one summary.

Everything runs on tiny exported models (a 2-block ViT at 32 px and a ResNet-18 at 64 px,
random init with a fixed seed: ``benchmarks/synthetic.py``, which the tests use too), real
files on disk, a real faiss index and a real ``tritonserver``; nothing is mocked. Three parts:

``faults``  each fault injected, then the recovery or the clear error checked:
            an ``index build`` SIGKILLed at each publishing phase (``DINOSERVE_INDEX_KILL_AT``:
            the index still opens with the last published generation, the next update and
            build recover on their own); flipped bytes in ``index.faiss`` and a 0-byte
            ``embeddings.npy`` (``IndexDamagedError``, never neighbours); a 0-byte and a
            truncated ``model.onnx`` used in-process (``ModelFileError``, one line); 0-byte
            and text weights files for ``load_backbone``, ``export`` and ``train --resume``
            (``UnreadableWeightsError``, one line); a training run SIGKILLed while writing
            its checkpoint (``--resume`` removes the temp file and finishes); SIGKILL of the
            Python-backend runner under a real ``TritonServer`` (readiness false, then the
            model is reloaded and answers what it answered before); SIGKILL of the
            tritonserver under ``dinoserve serve`` with its runners stopped (``serve`` exits 1
            naming the signal; no runner process, no /dev/shm region left).
``inputs``  odd inputs given to ``Client.embed`` in-process and through the server:
            corrupt, truncated, empty, text-as-PNG, decompression-bomb, missing files and a
            folder passed as an image must raise a ``DinoserveError`` naming the input, in one
            line; grayscale, CMYK, RGBA, palette+transparency and 16-bit images must be
            embedded (finite, unit-norm); wrong arguments (None, 42, 0-d/1-d/5-d arrays,
            dict, set) must raise ``InputTypeError`` saying what was passed.
            Each outcome is ``handled``, ``raised_clearly`` or ``failed_badly``.
``load``    ``--clients`` concurrent ``dinoserve.Client`` objects against one real
            tritonserver on 127.0.0.1 for ``--seconds`` s, alternating gRPC and HTTP, each
            sending ``--request-images`` images per request with no retries: requests
            served, errors, wrong answers (every served embedding is compared with the
            in-process one), p50/p95/p99 latency, and the server's own success/failure
            counters.

    nice -n 10 .venv/bin/python -m benchmarks.reliability            # 16 clients, 20 s
    .venv/bin/python -m benchmarks.reliability --clients 64 --seconds 60
    .venv/bin/python -m benchmarks.reliability --parts inputs --name reliability-try

Writes ``benchmarks/results/reliability.json`` (``--name``): a ``summary`` (faults survived,
inputs handled / raised clearly / failed badly, requests served, errors) to compare from one
release to the next, then every case with its detail. Exits 1 when a fault was not survived,
an input failed badly or the load test saw an error or a wrong answer.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.harness import REPO, machine, percentiles, scrape_metrics, write_json
from benchmarks.synthetic import SHAPES, bomb_png, build_tiny_repo, draw_shape, make_image_folder

NAME = "reliability"
PARTS = ("faults", "inputs", "load")
#: generous bounds on waiting (the machine may be loaded), not claims about speed
WAIT_S = 180.0
SUBPROCESS_S = 600.0


class Failed(AssertionError):
    """A check of a case did not hold."""


def check(condition: object, message: str) -> None:
    if not condition:
        raise Failed(message)


def until(condition: Callable[[], bool], what: str, limit: float = WAIT_S) -> float:
    """Wait for ``condition()`` for at most ``limit`` s; the seconds it took."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > limit:
            raise Failed(f"still waiting after {limit:.0f} s for: {what}")
        time.sleep(0.1)
    return time.monotonic() - t0


def one_line(text: str) -> str:
    return " ".join(text.split())[:400]


def run_case(name: str, fn: Callable[[], str]) -> dict:
    """Run one fault case: ``fn`` injects the fault and checks the outcome, returning what it saw."""
    t0 = time.monotonic()
    try:
        detail, survived = fn(), True
    except Failed as e:
        detail, survived = f"NOT SURVIVED: {e}", False
    except Exception as e:  # noqa: BLE001 - an unexpected exception is a finding, not a crash of the script
        where = traceback.extract_tb(e.__traceback__)[-1]
        detail, survived = (f"NOT SURVIVED: unexpected {type(e).__name__}: {one_line(str(e))} "
                            f"({Path(where.filename).name}:{where.lineno})"), False
    row = {"name": name, "survived": survived, "detail": detail, "seconds": round(time.monotonic() - t0, 2)}
    print(f"  {'ok ' if survived else 'BAD'} {name} ({row['seconds']:.1f} s): {detail}", flush=True)
    return row


# ======================================================================================
# the CLI in this process, and its one-line errors
# ======================================================================================

def cli(*args: str) -> tuple[int, str]:
    """``dinoserve ARGS`` in this process (click's runner): exit code and everything it printed."""
    from click.testing import CliRunner

    from dinoserve.cli import cli as dinoserve_cli

    r = CliRunner().invoke(dinoserve_cli, list(args))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        return r.exit_code, r.output + "".join(traceback.format_exception(r.exception))
    return r.exit_code, r.output


def check_one_line_error(code: int, output: str, *must_contain: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    check(code == 1, f"exit code {code}, expected 1; output: {one_line(output)}")
    check("Traceback" not in output, f"a traceback: {one_line(output)}")
    check(len(lines) == 1, f"{len(lines)} lines, expected one: {one_line(output)}")
    for text in must_contain:
        check(text in lines[0], f"{text!r} not in the message: {lines[0]}")
    return lines[0]


# ======================================================================================
# part 1: faults
# ======================================================================================

def index_faults(work: Path, repo: Path, vit) -> list[dict]:
    from dinoserve import index_store
    from dinoserve.errors import IndexDamagedError
    from dinoserve.index import EmbeddingIndex, build_index, search, update_index

    rows = []

    def entries(out: Path) -> list[str]:
        return sorted(p.name for p in out.iterdir())

    def killed_at(phase: str) -> str:
        base = work / f"kill-{phase}"
        old, new, out = base / "old", base / "new", base / "photos.index"
        make_image_folder(old, per_class=1, size=32)  # 3 images
        make_image_folder(new, per_class=2, size=32, seed=5)  # 6 images
        build_index(old, out, vit, progress=False)
        build_index(old, out, vit, progress=False)  # gen-000002 live, gen-000001 the previous one
        live = index_store.current_generation(out).name
        before = EmbeddingIndex.load(out)
        listed = set(entries(out))
        env = dict(os.environ, **{index_store.KILL_AT_ENV: phase})
        cmd = [sys.executable, "-m", "dinoserve", "index", "build", str(new), "--out", str(out), "--repo", str(repo),
               "--model", "vit_tiny", "--no-progress"]
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=SUBPROCESS_S)
        check(p.returncode == -signal.SIGKILL, f"index build exited {p.returncode}, not SIGKILLed: {one_line(p.stderr[-800:])}")
        debris = [e for e in entries(out) if e not in listed]  # what the kill left
        after = EmbeddingIndex.load(out)
        seen = index_store.current_generation(out).name
        if phase == "published":
            check(seen == "gen-000003" and len(after) == 6, f"published build not seen: {seen}, {len(after)} images")
        else:
            check(seen == live, f"reader saw {seen}, the last published was {live}")
            check(after.paths == before.paths and np.array_equal(after.embeddings, before.embeddings),
                  "the last published generation changed")
        update_index(out, vit, progress=False)
        left = [e for e in entries(out) if e.startswith((".staging-", ".CURRENT."))]
        check(not left, f"the next update left {left}")
        check(index_store.current_generation(out).name == seen, "the next update did not keep the published generation")
        report = build_index(new, out, vit, progress=False)
        check(report.count == 6, f"the next build indexed {report.count} of 6 images")
        final = index_store.current_generation(out).name
        check(entries(out) == sorted([".lock", "CURRENT", seen, final]), f"after the next build: {entries(out)}")
        query = new / "square" / "square_001.png"
        hit = search(vit, [query], out, k=1)[0][0]
        check(hit.path == str(query), f"top hit of {query.name} is {hit.path}")
        return (f"killed at {phase} (left: {', '.join(debris) or 'nothing new'}); "
                f"reader saw {seen} ({len(after)} images); next update cleaned up and kept {seen}; "
                f"next build published {final}; top hit of a query is itself")

    for phase in index_store.PHASES:
        rows.append(run_case(f"index build SIGKILLed at '{phase}'", lambda phase=phase: killed_at(phase)))

    photos = work / "photos"

    def damaged(kind: str) -> str:
        out = work / f"damaged-{kind}.index"
        build_index(photos, out, vit, progress=False)
        gen = index_store.current_generation(out)
        if kind == "faiss":
            target = gen / index_store.FAISS
            data = bytearray(target.read_bytes())
            for i in range(len(data) // 2, len(data) // 2 + 64):
                data[i] ^= 0xFF
            target.write_bytes(bytes(data))
        else:
            target = gen / index_store.EMBEDDINGS
            target.write_bytes(b"")
        query = photos / "circle" / "circle_001.png"
        for what, call in (("EmbeddingIndex.load", lambda: EmbeddingIndex.load(out)),
                           ("search", lambda: search(vit, [query], out, k=3)),
                           ("update_index", lambda: update_index(out, vit, progress=False))):
            try:
                got = call()
            except IndexDamagedError as e:
                message = str(e)
                check(target.name in message and "damaged" in message and "rebuild" in message,
                      f"{what}: unclear message: {message}")
            else:
                raise Failed(f"{what} returned {type(got).__name__} from a damaged index instead of an error")
        code, output = cli("search", str(query), "--index", str(out), "--repo", str(repo), "--model", "vit_tiny")
        line = check_one_line_error(code, output, "is damaged", "index build")
        build_index(photos, out, vit, progress=False)  # the fix the message names
        check(len(EmbeddingIndex.load(out)) == 24, "the rebuilt index does not hold the 24 images")
        return f"load, search and update raise IndexDamagedError; `dinoserve search`: {line}; rebuild works"

    rows.append(run_case("index.faiss with 64 flipped bytes", lambda: damaged("faiss")))
    rows.append(run_case("0-byte embeddings.npy in an index", lambda: damaged("embeddings")))
    return rows


def model_file_faults(work: Path, repo: Path) -> list[dict]:
    from dinoserve.client import Client
    from dinoserve.errors import ModelFileError

    photo = work / "photos" / "circle" / "circle_000.png"

    def damaged_onnx(kind: str) -> str:
        private = work / f"repo-{kind}"
        shutil.copytree(repo / "vit_tiny", private / "vit_tiny")
        onnx = private / "vit_tiny" / "1" / "model.onnx"
        data = onnx.read_bytes()
        onnx.write_bytes(b"" if kind == "empty" else data[: len(data) // 2])
        try:
            Client(repo=private)
        except ModelFileError as e:
            message = str(e)
            check("\n" not in message and str(onnx) in message and "re-export" in message, f"unclear: {message}")
        else:
            raise Failed("Client opened a damaged model.onnx")
        out = work / f"e-{kind}.npy"
        code, output = cli("embed", str(photo), "--out", str(out), "--repo", str(private))
        line = check_one_line_error(code, output, str(onnx), "re-export")
        check(not out.exists(), "embed wrote an output from a damaged model")
        return f"Client: ModelFileError; `dinoserve embed`: {line}"

    return [run_case("0-byte model.onnx used in-process", lambda: damaged_onnx("empty")),
            run_case("truncated model.onnx used in-process", lambda: damaged_onnx("truncated"))]


def weights_faults(work: Path) -> list[dict]:
    from dinoserve.errors import UnreadableWeightsError
    from dinoserve.models import load_backbone

    photos = work / "photos"
    files = {"0-byte": (b"", "empty file (0 bytes)"),
             "text": (b"this is not a checkpoint\n", "a text file")}
    rows = []

    def bad(kind: str, entry: str) -> str:
        data, expected = files[kind]
        folder = work / f"weights-{kind}-{entry.replace(' ', '').replace('-', '')}"
        folder.mkdir(parents=True)
        path = folder / "weights.pth"
        path.write_bytes(data)
        if entry == "load_backbone":
            try:
                load_backbone(path, arch="resnet18")
            except UnreadableWeightsError as e:
                message = str(e)
                check(message.startswith(f"{path}: ") and expected in message and "\n" not in message,
                      f"unclear: {message}")
                return f"UnreadableWeightsError: {message}"
            raise Failed("load_backbone accepted it")
        if entry == "export":
            code, output = cli("export", "--onnx", "--weights", str(path), "--name", "m", "--repo", str(folder / "repo"))
            check(not (folder / "repo").exists(), "export created a repository")
            return check_one_line_error(code, output, str(path), expected)
        if entry == "train --pretrained":
            code, output = cli("train", "--preset", "cpu_small", "--data", str(photos), "--pretrained", str(path),
                               "--out", str(folder / "run"), "--epochs", "1", "--batch-size", "8", "--quiet")
            return check_one_line_error(code, output, str(path), expected)
        run = folder / "run"
        run.mkdir()
        (run / "checkpoint.pth").write_bytes(data)
        code, output = cli("train", "--out", str(run), "--resume", "--quiet")
        line = check_one_line_error(code, output, str(run / "checkpoint.pth"), expected)
        check((run / "checkpoint.pth").read_bytes() == data, "--resume changed the damaged checkpoint")
        return line

    for kind in files:
        for entry in ("load_backbone", "export", "train --pretrained", "train --resume"):
            rows.append(run_case(f"{kind} weights file: {entry}", lambda kind=kind, entry=entry: bad(kind, entry)))
    return rows


#: A training run that SIGKILLs itself halfway through writing its second checkpoint (what
#: a kill while saving leaves: the old checkpoint and a partial ``.checkpoint.pth.*.tmp``).
KILLED_WHILE_SAVING = r"""
import io, json, os, signal, sys
import torch
import dinoserve.training.bookkeeping as bookkeeping
from dinoserve.atomic import atomic_write
from dinoserve.training import make_config, train

saves = [0]
real_save = bookkeeping.save_atomic

def save_then_die(obj, path):
    saves[0] += 1
    if saves[0] < 2:
        return real_save(obj, path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()

    def write(f):
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    atomic_write(path, write)

bookkeeping.save_atomic = save_then_die  # the checkpoint writer the Bookkeeper calls
train(make_config(**json.loads(sys.argv[1])))
"""

#: tests/test_training_run.py's TINY run: 2 epochs of 3 steps on 12 images
TINY_TRAIN = dict(arch="vit_tiny_patch16_224", depth=2, patch_size=8, global_crop_size=32, local_crop_size=16,
                  local_crops=2, out_dim=128, hidden_dim=64, bottleneck_dim=32, batch_size=4, num_workers=0, epochs=2,
                  lr=0.05, warmup_epochs=0, log_every=1, progress=False, precision="fp32", momentum_teacher=0.9,
                  drop_path_rate=0.1, seed=1)


def training_fault(work: Path) -> list[dict]:
    from dinoserve.models import read_checkpoint

    def killed_while_saving() -> str:
        data, out = work / "twelve", work / "train-run"
        make_image_folder(data, per_class=4, size=48, seed=5)
        config = dict(TINY_TRAIN, data=str(data), out=str(out))
        p = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, json.dumps(config)], cwd=REPO,
                           capture_output=True, text=True, timeout=SUBPROCESS_S)
        check(p.returncode == -signal.SIGKILL, f"training exited {p.returncode}: {one_line(p.stderr[-800:])}")
        stale = sorted(out.glob(".checkpoint.pth.*.tmp"))
        check(stale, f"no temp file left by the kill: {sorted(x.name for x in out.iterdir())}")
        size = stale[0].stat().st_size
        check(read_checkpoint(out / "checkpoint.pth")["epoch"] == 1, "the epoch-1 checkpoint is not intact")
        code, output = cli("train", "--out", str(out), "--resume", "--quiet")
        check(code == 0, f"train --resume exited {code}: {one_line(output[-800:])}")
        left = sorted(x.name for x in out.iterdir() if x.name.startswith("."))
        check(not left, f"left after --resume: {left}")
        epoch = read_checkpoint(out / "checkpoint.pth")["epoch"]
        check(epoch == 2, f"the resumed run saved epoch {epoch}, expected 2")
        return (f"killed halfway through writing the epoch-2 checkpoint: {stale[0].name} ({size} bytes) left, "
                f"epoch-1 checkpoint intact; `train --resume` removed it and finished epoch 2")

    return [run_case("training SIGKILLed while writing its checkpoint", killed_while_saving)]


def runner_fault(server, repo: Path) -> dict:
    """SIGKILL the Python-backend runner of ``vit_tiny`` under ``server``; it must be reloaded."""
    from dinoserve import triton_process as proc_tree
    from dinoserve.client import Client
    from dinoserve.errors import DinoserveError

    def status(url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return -1

    def kill_runner() -> str:
        images = shape_pictures(4, 48, seed=11)
        with Client(repo=repo, model="vit_tiny") as local:
            expected = local.embed(images)
        runners = [r for r in server.runners() if r.model == "vit_tiny"]
        check(runners, "no Python-backend runner of vit_tiny found")
        runner = runners[0]
        region = Path(proc_tree.SHM_DIR, runner.shm_region)
        os.kill(runner.pid, signal.SIGKILL)
        until(lambda: not proc_tree.is_alive(runner.pid), "the runner to die")
        with Client(server.grpc_url, model="vit_tiny", retries=0) as remote:
            try:
                remote.embed(images)
                before = "a request between the kill and the reload was answered"
            except DinoserveError as e:
                before = f"a request before the reload failed ({type(e).__name__})"
        seen: dict[str, Any] = {"events": []}

        def notify(event: str, model: str, message: str) -> None:
            seen["events"].append(event)
            if event == "unloaded":
                seen["ready"] = (status(server.http_url + "/v2/health/ready"),
                                 status(server.http_url + f"/v2/models/{model}/ready"))

        reloaded = server.check(notify)
        check(reloaded == ["vit_tiny"], f"check() reloaded {reloaded}")
        check(seen["events"] == ["runner-died", "unloaded", "reloaded"], f"events {seen['events']}")
        check(seen.get("ready") and all(code != 200 for code in seen["ready"]),
              f"server/model readiness while reloading: {seen.get('ready')}")
        check(status(server.http_url + "/v2/health/ready") == 200, "not ready after the reload")
        new = [r for r in server.runners() if r.model == "vit_tiny"]
        check(new and new[0].pid != runner.pid, "no new runner")
        check(not region.exists(), f"the dead runner's {region} is still there")
        with Client(server.grpc_url, model="vit_tiny", retries=0) as remote:
            got = remote.embed(images)
        diff = float(np.abs(got - expected).max())
        check(diff < 1e-4, f"after the reload the served embeddings differ by {diff}")
        return (f"runner pid {runner.pid} SIGKILLed; {before}; readiness (server, model) while reloading "
                f"{seen['ready']}; reloaded (runner pid {new[0].pid}), its /dev/shm region gone; "
                f"answers equal in-process ones (max |diff| {diff:.1e})")

    return run_case("SIGKILL of the Python-backend runner under TritonServer", kill_runner)


def tritonserver_fault(repo: Path) -> dict:
    """SIGKILL tritonserver under ``dinoserve serve`` (its runners SIGSTOPped first, so they
    cannot exit by themselves); nothing may be left."""
    from dinoserve import triton_process as proc_tree

    def kill_server() -> str:
        cmd = [sys.executable, "-m", "dinoserve", "serve", "--repo", str(repo), "--model", "resnet_tiny",
               "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                                    start_new_session=True)
            runners: list = []
            try:
                line = proc.stdout.readline()
                if not line:
                    proc.wait(timeout=60)
                    err.seek(0)
                    raise Failed(f"serve did not start: {one_line(err.read()[-800:])}")
                pid = json.loads(line)["pid"]
                runners = [r for r in (proc_tree.runner_of(i) for i in proc_tree.group_members(pid) if i.alive) if r]
                check(runners, "serve started no runner")
                regions = [Path(proc_tree.SHM_DIR, r.shm_region) for r in runners]
                check(all(p.exists() for p in regions), "a runner has no /dev/shm region")
                for r in runners:
                    os.kill(r.pid, signal.SIGSTOP)
                os.kill(pid, signal.SIGKILL)
                code = proc.wait(timeout=WAIT_S)
                check(code == 1, f"serve exited {code}, expected 1")
                until(lambda: not any(proc_tree.is_alive(r.pid) for r in runners), "the runners to be gone")
                until(lambda: not any(p.exists() for p in regions), "their /dev/shm regions to be gone")
                err.seek(0)
                out = err.read()
                check("tritonserver was killed by SIGKILL (exit code -9)" in out, f"cause not named: {one_line(out[-600:])}")
                check("Traceback" not in out and "+----" not in out, f"traceback or option table: {one_line(out[-600:])}")
                cause = next(x for x in out.splitlines() if "killed by SIGKILL" in x)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                for r in runners:  # whatever a failed check left
                    with contextlib.suppress(ProcessLookupError):
                        if proc_tree.is_alive(r.pid):
                            os.kill(r.pid, signal.SIGKILL)
        return (f"tritonserver pid {pid} SIGKILLed with {len(runners)} runner(s) stopped: serve exit 1 "
                f"({one_line(cause).split(' (SIGKILL comes')[0]}); no runner process and no /dev/shm region left")

    return run_case("SIGKILL of tritonserver under dinoserve serve", kill_server)


# ======================================================================================
# part 2: bad inputs
# ======================================================================================

def shape_pictures(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` uint8 HxWx3 pictures of the test shapes."""
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(draw_shape(SHAPES[i % 3], rng, size)) for i in range(n)])


def bad_input_files(folder: Path) -> list[tuple[str, Any, str, str]]:
    """(name, input, expected outcome, text the error must contain) for each odd file."""
    from PIL import Image

    folder.mkdir(parents=True)
    rgb = shape_pictures(1, 64, seed=3)[0]

    def save(name: str, img: Image.Image, **kw) -> Path:
        p = folder / name
        img.save(p, **kw)
        return p

    good_png = save("good.png", Image.fromarray(rgb))
    png = good_png.read_bytes()
    corrupt = folder / "corrupt.png"  # a real PNG whose compressed pixels are overwritten
    corrupt.write_bytes(png[:60] + bytes(b ^ 0x5A for b in png[60:-20]) + png[-20:])
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, "JPEG", quality=90)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    text = folder / "notes.png"
    text.write_text("hello, this is not an image\n")
    bomb = folder / "bomb.png"
    bomb.write_bytes(bomb_png(30000, 30000))  # 900 megapixels, under 2 MB on disk
    directory = folder / "photos.jpg"
    directory.mkdir()
    pal = Image.new("P", (64, 64))
    pal.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)
    for x in range(32):
        for y in range(64):
            pal.putpixel((x, y), 1)
    rgba = np.dstack([rgb, np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))])
    gray16 = (rgb[:, :, 0].astype(np.uint16) * 257)
    return [
        ("corrupt PNG (scrambled pixel data)", corrupt, "error", corrupt.name),
        ("truncated JPEG (first half)", truncated, "error", truncated.name),
        ("empty file (0 bytes)", empty, "error", empty.name),
        ("text file named .png", text, "error", text.name),
        ("decompression bomb (900 MP PNG)", bomb, "error", bomb.name),
        ("missing file", folder / "missing.jpg", "error", "missing.jpg"),
        ("a folder passed as an image", directory, "error", directory.name),
        ("grayscale PNG (L)", save("gray.png", Image.fromarray(rgb[:, :, 1], "L")), "embed", ""),
        ("CMYK JPEG", save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=90), "embed", ""),
        ("RGBA PNG (alpha ramp)", save("alpha.png", Image.fromarray(rgba, "RGBA")), "embed", ""),
        ("palette PNG with transparency", save("palette.png", pal, transparency=1), "embed", ""),
        ("16-bit grayscale PNG (I;16)", save("gray16.png", Image.fromarray(gray16)), "embed", ""),
        ("16-bit grayscale numpy array", gray16, "embed", ""),
        ("grayscale numpy array HxW", rgb[:, :, 0].copy(), "embed", ""),
        ("RGBA numpy array", rgba, "embed", ""),
        ("undecodable bytes", b"\x00\x01 not an image", "error", "image #0"),
    ]


WRONG_ARGUMENTS = [
    ("None", None, "got None"),
    ("int 42", 42, "got int 42"),
    ("0-d numpy array", np.array(7, np.uint8), "got a 0-d numpy array"),
    ("1-d numpy array", np.zeros(5, np.uint8), "got a 1-d numpy array"),
    ("5-d numpy array", np.zeros((1, 2, 2, 2, 3), np.uint8), "got a 5-d numpy array"),
    ("dict of paths", {"a.png": 1, "b.png": 2}, "got a dict with 2 keys"),
    ("set of paths", {"a.png"}, "got a set of 1 items"),
    ("int inside a list", ["__GOOD__", 42], "image #1"),
]


def classify(client, value: Any, expected: str, must_contain: str,
             reference: np.ndarray | None) -> tuple[str, str, np.ndarray | None]:
    """``handled``, ``raised_clearly`` or ``failed_badly``, what happened, and the vectors if any.

    ``reference``: what another backend embedded for the same input (the answers must agree).
    """
    from dinoserve.errors import DinoserveError

    try:
        vectors = client.embed(value)
    except DinoserveError as e:
        message = str(e)
        if must_contain and must_contain not in message:
            return "failed_badly", f"{type(e).__name__} without {must_contain!r}: {one_line(message)}", None
        if "\n" in message:
            return "failed_badly", f"{type(e).__name__} over several lines: {one_line(message)}", None
        outcome = "raised_clearly" if expected == "error" else "failed_badly"
        return outcome, f"{type(e).__name__}: {message}", None
    except Exception as e:  # noqa: BLE001 - not one of ours: the finding this part looks for
        return "failed_badly", f"{type(e).__name__} (not a DinoserveError): {one_line(str(e))}", None
    vectors = np.asarray(vectors)
    if vectors.shape != (1, client.dim) or not np.isfinite(vectors).all():
        return "failed_badly", f"returned {vectors.shape} vectors, finite={bool(np.isfinite(vectors).all())}", vectors
    norm = float(np.linalg.norm(vectors[0]))
    if abs(norm - 1) > 1e-3:
        return "failed_badly", f"embedding norm {norm:.4f}, expected 1", vectors
    if expected == "error":
        return "failed_badly", "embedded an input that should have been refused", vectors
    agree = ""
    if reference is not None:
        diff = float(np.abs(vectors - reference).max())
        if diff > 1e-4:
            return "failed_badly", f"differs from the first backend's embedding by {diff:.2e}", vectors
        agree = f", equal to the first backend's (max |diff| {diff:.1e})"
    return "handled", f"embedded, shape {vectors.shape}, norm {norm:.4f}{agree}", vectors


def input_cases(work: Path, clients: dict[str, Any]) -> list[dict]:
    files = bad_input_files(work / "odd-inputs")
    good = work / "odd-inputs" / "good.png"
    rows = []
    first: dict[str, np.ndarray] = {}  # name -> what the first backend embedded
    for backend, client in clients.items():
        cases = [(f"{name}", value, expected, text) for name, value, expected, text in files]
        cases += [(f"Client.embed({name})", [good if v == "__GOOD__" else v for v in value] if isinstance(value, list)
                   else value, "error", text) for name, value, text in WRONG_ARGUMENTS]
        for name, value, expected, text in cases:
            t0 = time.monotonic()
            outcome, detail, vectors = classify(client, value, expected, text, first.get(name))
            if vectors is not None:
                first.setdefault(name, vectors)
            rows.append({"name": name, "backend": backend, "expected": "embedded" if expected == "embed" else "clear error",
                         "outcome": outcome, "detail": detail, "seconds": round(time.monotonic() - t0, 3)})
            mark = "ok " if outcome != "failed_badly" else "BAD"
            print(f"  {mark} [{backend}] {name}: {outcome}: {detail[:160]}", flush=True)
    return rows


# ======================================================================================
# part 3: load
# ======================================================================================

def latency_summary(latencies_s: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 and the worst latency in ms, to 0.01 ms; all None when nothing was served."""
    if not latencies_s:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    return {**{k: round(v, 2) for k, v in percentiles(latencies_s).items()},
            "max_ms": round(float((np.asarray(latencies_s) * 1e3).max()), 2)}


def load_test(server, repo: Path, model: str, clients: int, seconds: float, request_images: int,
              max_requests: int) -> dict:
    """``clients`` threads, each with its own Client (gRPC and HTTP alternately), for ``seconds``."""
    from dinoserve.client import Client

    # Each client sends its own images; the answers must be the in-process ones.
    inputs = [shape_pictures(request_images, 48, seed=100 + i) for i in range(clients)]
    with Client(repo=repo, model=model) as local:
        expected = [local.embed(x) for x in inputs]
    protocols = ["grpc" if i % 2 == 0 else "http" for i in range(clients)]
    results = [{"protocol": p, "served": 0, "errors": {}, "wrong": 0, "max_diff": 0.0, "latencies": []}
               for p in protocols]
    barrier = threading.Barrier(clients + 1)
    stop_at = [time.monotonic() + 3600.0]  # set once every client is connected and warm

    def count_error(r: dict, e: BaseException) -> None:
        key = f"{type(e).__name__}: {one_line(str(e))[:120]}"
        r["errors"][key] = r["errors"].get(key, 0) + 1

    def worker(i: int) -> None:
        r = results[i]
        url = server.grpc_url if protocols[i] == "grpc" else server.http_url
        client = None
        try:
            client = Client(url, model=model, retries=0, timeout=60.0, concurrency=1, batch_size=request_images)
            client.embed(inputs[i])  # warm this client's connection
        except Exception as e:  # noqa: BLE001 - counted, and the run goes on
            count_error(r, e)
        barrier.wait()
        try:
            for _ in range(max_requests):  # bounded: by time and by count
                if time.monotonic() >= stop_at[0] or client is None:
                    break
                t = time.perf_counter()
                try:
                    got = client.embed(inputs[i])
                except Exception as e:  # noqa: BLE001
                    count_error(r, e)
                    continue
                r["latencies"].append(time.perf_counter() - t)
                r["served"] += 1
                diff = float(np.abs(got - expected[i]).max()) if got.shape == expected[i].shape else float("inf")
                r["max_diff"] = max(r["max_diff"], diff)
                if diff > 1e-4:
                    r["wrong"] += 1
        finally:
            if client is not None:
                client.close()

    before = scrape_metrics(server.metrics_url, model)
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait(timeout=WAIT_S)
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    for t in threads:
        t.join(timeout=seconds + WAIT_S)
    wall = time.monotonic() - t0
    hung = sum(t.is_alive() for t in threads)
    after = scrape_metrics(server.metrics_url, model)

    def totals(rows: list[dict]) -> dict:
        lat = [x for r in rows for x in r["latencies"]]
        errors: dict[str, int] = {}
        for r in rows:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        served = sum(r["served"] for r in rows)
        return {"clients": len(rows), "requests_served": served, "images_served": served * request_images,
                "errors": sum(errors.values()), "wrong_answers": sum(r["wrong"] for r in rows),
                "max_abs_diff_vs_in_process": max((r["max_diff"] for r in rows), default=0.0),
                "req_per_s": round(served / wall, 2), **latency_summary(lat), "error_kinds": errors}

    server_counts = {k.replace("nv_inference_", ""): after.get(k, 0) - before.get(k, 0)
                     for k in ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                               "nv_inference_exec_count")}
    return {"model": model, "clients": clients, "seconds": seconds, "wall_s": round(wall, 2),
            "request_images": request_images, "retries": 0, "hung_clients": hung,
            "all": totals(results),
            "by_protocol": {p: totals([r for r in results if r["protocol"] == p]) for p in ("grpc", "http")},
            "server_metrics": server_counts}


# ======================================================================================

def uncommitted_changes() -> list[str]:
    """Tracked files that differ from the commit ``machine()["git"]`` names (what was measured)."""
    try:
        r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line[3:] for line in r.stdout.splitlines() if line.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--clients", type=int, default=16, help="concurrent load-test clients (gRPC and HTTP alternately)")
    ap.add_argument("--seconds", type=float, default=20.0, help="load-test duration")
    ap.add_argument("--request-images", type=int, default=4, help="images per load-test request")
    ap.add_argument("--max-requests", type=int, default=100_000, help="bound on requests per load-test client")
    ap.add_argument("--name", default=NAME, help="results/<name>.json")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {unknown}; use {','.join(PARTS)}")

    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="dinoserve-reliability-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["XDG_CACHE_HOME"] = str(work / "cache")  # training's decoded-image stores stay in here
    data: dict[str, Any] = {
        "what": "faults survived, odd inputs handled or refused clearly, and a load test against a real "
                "tritonserver, on tiny exported models",
        "command": "python -m benchmarks.reliability " + " ".join(sys.argv[1:]),
        "parts": parts,
    }
    try:
        from dinoserve.client import Client
        from dinoserve.triton import TritonServer

        print(f"work folder {work}; exporting the tiny models ...", flush=True)
        repo = build_tiny_repo(work / "tiny")
        make_image_folder(work / "photos")  # 24 PNGs in three class folders
        faults: list[dict] = []
        with Client(repo=repo, model="vit_tiny") as vit:
            if "faults" in parts:
                print("faults:", flush=True)
                faults += index_faults(work, repo, vit)
                faults += model_file_faults(work, repo)
                faults += weights_faults(work)
                faults += training_fault(work)
            print("starting tritonserver ...", flush=True)
            with TritonServer(repo, log_file=work / "tritonserver.log", startup_timeout=WAIT_S) as server:
                if "inputs" in parts:
                    print("inputs:", flush=True)
                    with Client(server.grpc_url, model="vit_tiny") as served:
                        data["inputs"] = input_cases(work, {"in-process": vit, "triton-grpc": served})
                if "load" in parts:
                    print(f"load: {args.clients} clients for {args.seconds:.0f} s ...", flush=True)
                    data["load"] = load_test(server, repo, "vit_tiny", args.clients, args.seconds,
                                             args.request_images, args.max_requests)
                    a = data["load"]["all"]
                    print(f"  {a['requests_served']} requests served, {a['errors']} errors, "
                          f"{a['wrong_answers']} wrong answers, p50 {a['p50_ms']} ms, p95 {a['p95_ms']} ms", flush=True)
                if "faults" in parts:  # after the load test, so that its figures are a clean server's
                    faults.append(runner_fault(server, repo))
            if "faults" in parts:
                faults.append(tritonserver_fault(repo))
                data["faults"] = faults
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    summary: dict[str, Any] = {}
    bad = False
    if "faults" in data:
        survived = sum(f["survived"] for f in data["faults"])
        summary["faults"] = {"cases": len(data["faults"]), "survived": survived,
                             "not_survived": [f["name"] for f in data["faults"] if not f["survived"]]}
        bad |= survived < len(data["faults"])
    if "inputs" in data:
        counts = {k: sum(r["outcome"] == k for r in data["inputs"]) for k in ("handled", "raised_clearly", "failed_badly")}
        summary["inputs"] = {"cases": len(data["inputs"]), **counts,
                             "failed_badly_cases": [f"[{r['backend']}] {r['name']}" for r in data["inputs"]
                                                    if r["outcome"] == "failed_badly"]}
        bad |= counts["failed_badly"] > 0
    if "load" in data:
        a = data["load"]["all"]
        summary["load"] = {k: a[k] for k in ("clients", "requests_served", "images_served", "errors", "wrong_answers",
                                             "req_per_s", "p50_ms", "p95_ms")}
        summary["load"]["seconds"] = data["load"]["seconds"]
        summary["load"]["server_request_failures"] = data["load"]["server_metrics"]["request_failure"]
        bad |= a["errors"] > 0 or a["wrong_answers"] > 0 or data["load"]["hung_clients"] > 0
    summary["total_s"] = round(time.monotonic() - t_start, 1)
    out = {"summary": summary, **data, "machine": machine(), "uncommitted_changes": uncommitted_changes()}
    path = write_json(args.name, out)
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
