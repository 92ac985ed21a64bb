"""The tritonserver process tree: start it so that it dies with us, see its runners, and
leave nothing behind when it stops or crashes.

Triton's Python backend runs every model instance in a stub process
(``triton_python_backend_stub``, which executes :mod:`dinoserve.triton_runner`). The stub
talks to the server through a POSIX shared-memory region,
``/dev/shm/triton_python_backend_shm_region_<uuid>``, and its command line names the
model file, that region, the server's pid and the instance::

    stub  <repo>/<model>/<version>/model.py  <region>  <size>  <grow>  <server pid>  <backend dir>  <ipc size>  <instance>  <kind>

:class:`dinoserve.triton.TritonServer` starts the server in its own process group (so every
stub is a member of it, whoever its parent is by then) and uses this module to find the
stubs of that group (:class:`RunnerTracker`), tell whether one has died and why, kill what
is left when the server is gone, and unlink the regions of that server only. Each server's
working folder names its owner (:func:`new_workdir`), so the folder of a process killed
before it could clean up is removed by the next server. Linux only (``/proc``, ``prctl``);
elsewhere the helpers find nothing and do nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

__all__ = [
    "ProcessInfo", "Runner", "RunnerTracker", "SHM_PREFIX", "describe_exit", "group_members", "is_alive",
    "kill_and_wait", "new_workdir", "owner_alive", "owner_token", "parent_death_signal", "remove_shm_regions",
    "runner_of", "why_gone",
]

PROC = Path("/proc")
SHM_DIR = Path("/dev/shm")
#: Name prefix of the Python backend's shared-memory regions (never touch anything else there).
SHM_PREFIX = "triton_python_backend_shm_region_"
STUB_NAME = "triton_python_backend_stub"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
#: A server's working folder (serving folder, log) in the temp dir, and the file naming its owner.
WORKDIR_PREFIX = "dinoserve-triton-"
_OWNER_FILE = "owner"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessInfo:
    """One line of ``/proc/<pid>/stat`` (the fields we need) plus the command line."""

    pid: int
    ppid: int
    pgid: int
    state: str  # R, S, D, T, Z (zombie: dead, waiting for its parent to collect it) ...
    exit_status: int  # a zombie's wait status (as waitpid reports it); 0 otherwise
    start_time: int  # clock ticks after boot; with the pid, names this process for good
    argv: tuple[str, ...]

    @property
    def alive(self) -> bool:
        """False for a zombie (dead, not yet collected) or a dead process."""
        return self.state not in ("Z", "X")


@dataclass(frozen=True)
class Runner:
    """A Python-backend stub process serving one instance of one model."""

    pid: int
    model: str
    instance: str  # e.g. "resnet_tiny_0_0"
    shm_region: str  # file name under /dev/shm
    server_pid: int


def process_info(pid: int) -> ProcessInfo | None:
    """``pid``'s state, or None when there is no such process (or it cannot be read)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # comm (field 2) is in parentheses and may itself hold spaces or ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    exit_status = int(fields[49]) if len(fields) > 49 else 0  # field 52, Linux >= 3.5
    return ProcessInfo(pid=pid, ppid=int(fields[1]), pgid=int(fields[2]), state=fields[0],
                       exit_status=exit_status, start_time=int(fields[19]),
                       argv=tuple(a.decode(errors="replace") for a in argv if a))


def group_members(pgid: int) -> list[ProcessInfo]:
    """Every process (zombies included) whose process group is ``pgid``."""
    if not PROC.is_dir():
        return []
    members = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            info = process_info(int(entry.name))
            if info is not None and info.pgid == pgid:
                members.append(info)
    return members


def runner_of(info: ProcessInfo) -> Runner | None:
    """The runner ``info`` is, when it is a Python-backend stub; else None."""
    argv = info.argv
    if len(argv) < 9 or not argv[0].endswith(STUB_NAME) or not argv[2].startswith(SHM_PREFIX):
        return None
    try:
        server_pid = int(argv[5])
    except ValueError:
        return None
    model = Path(argv[1]).parent.parent.name  # <repo>/<model>/<version>/model.py
    return Runner(pid=info.pid, model=model, instance=argv[8], shm_region=argv[2], server_pid=server_pid)


def is_alive(pid: int) -> bool:
    """True while ``pid`` exists and has not died (a zombie has)."""
    info = process_info(pid)
    return info is not None and info.alive


def describe_exit(returncode: int) -> str:
    """``Popen.returncode`` in words: "was killed by SIGKILL (exit code -9)", "exited with code 1"."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name} (exit code {returncode})"
    return f"exited with code {returncode}"


def why_gone(pid: int) -> str:
    """How ``pid`` ended, as far as can still be seen: a zombie keeps its wait status."""
    info = process_info(pid)
    if info is None:
        return "is gone"
    if info.alive:
        return "is still running"
    status = info.exit_status
    if os.WIFSIGNALED(status):
        return describe_exit(-os.WTERMSIG(status))
    if os.WIFEXITED(status):
        return describe_exit(os.WEXITSTATUS(status))
    return "died"


def kill_and_wait(pids: Iterable[int], timeout: float = 10.0, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to each of ``pids`` still alive and wait up to ``timeout`` s until none
    is; returns those still alive then (SIGKILL cannot be ignored, so normally none)."""
    pids = [p for p in pids if is_alive(p)]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if is_alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def remove_shm_regions(names: Iterable[str]) -> list[str]:
    """Unlink the Python backend's shared-memory regions ``names``; those removed.

    Only names with :data:`SHM_PREFIX` are touched. A region still mapped by a process
    stays valid for it; only the name goes, so this is safe once the owner is gone.
    """
    removed = []
    for name in names:
        if not name.startswith(SHM_PREFIX) or "/" in name:
            continue
        try:
            (SHM_DIR / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # not ours to remove (another user's); nothing else to do
    return removed


class RunnerTracker:
    """The runners of one server's process group as last seen alive, and every shared-memory
    region they used: what a reload has to replace and a stop has to clean up."""

    def __init__(self) -> None:
        self.runners: dict[int, Runner] = {}  # pid -> runner, as last seen alive
        self.shm_regions: set[str] = set()  # every region these runners used

    @staticmethod
    def live(pgid: int) -> list[Runner]:
        """The live runners in process group ``pgid`` right now."""
        return [runner for info in group_members(pgid)
                if (runner := runner_of(info)) is not None and info.alive]

    def track(self, pgid: int) -> None:
        """Remember the live runners of ``pgid`` and their regions."""
        for runner in self.live(pgid):
            self.runners[runner.pid] = runner
            self.shm_regions.add(runner.shm_region)

    def dead(self) -> dict[str, list[Runner]]:
        """Model -> its tracked runners that have died since they were seen alive."""
        dead: dict[str, list[Runner]] = {}
        for runner in list(self.runners.values()):
            if not is_alive(runner.pid):
                dead.setdefault(runner.model, []).append(runner)
        return dead

    def forget(self, runners: Iterable[Runner]) -> None:
        """Stop tracking ``runners`` (their regions stay listed until :meth:`release`)."""
        for runner in runners:
            self.runners.pop(runner.pid, None)

    def release(self, runners: Iterable[Runner]) -> None:
        """Unlink the regions of dead ``runners``: the server never unlinks a region whose
        runner was killed, and nothing uses it any more."""
        regions = [r.shm_region for r in runners]
        remove_shm_regions(regions)
        self.shm_regions.difference_update(regions)

    def pids(self, model: str) -> list[int]:
        """The tracked runner pids of ``model``."""
        return [r.pid for r in self.runners.values() if r.model == model]

    def clean_up_group(self, pgid: int) -> None:
        """After the server is gone: kill what is left of its process group (runners of a
        crashed server outlive it, and ignore SIGTERM), then unlink its shared memory."""
        left = [info for info in group_members(pgid) if info.alive]
        for info in left:
            runner = runner_of(info)
            if runner is not None:
                self.shm_regions.add(runner.shm_region)
        if left:
            log.info("tritonserver left %d process(es) behind; killing pid %s",
                     len(left), ", ".join(str(i.pid) for i in left))
            stuck = kill_and_wait([info.pid for info in left])
            if stuck:
                log.warning("processes %s of the stopped tritonserver did not die", stuck)
        remove_shm_regions(self.shm_regions)
        self.shm_regions.clear()
        self.runners.clear()


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when we die.

    Uses ``prctl(PR_SET_PDEATHSIG)``, so even a ``kill -9`` of this process stops the
    child (tritonserver shuts down cleanly on SIGTERM, stubs and shared memory included).
    The kernel sends the signal when the *thread* that started the child ends, so it is
    only set up from the main thread; elsewhere, and off Linux, this returns None.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # we died between fork and prctl: nobody will signal
            os.kill(os.getpid(), sig)

    return preexec


def owner_token(pid: int | None = None) -> str:
    """``"<pid> <start time>"`` of ``pid`` (this process by default): unlike a bare pid, it
    never names a later process that reuses the number. See :func:`owner_alive`."""
    pid = os.getpid() if pid is None else pid
    info = process_info(pid)
    return f"{pid} {info.start_time if info is not None else 0}"


def owner_alive(token: str) -> bool:
    """Whether the process an :func:`owner_token` named still runs (True when unsure)."""
    try:
        pid, start = (int(x) for x in token.split())
    except ValueError:
        return True
    if not PROC.is_dir():
        return True
    info = process_info(pid)
    return info is not None and info.alive and info.start_time == start


def new_workdir() -> Path:
    """A fresh working folder for one server, naming its owner (this process); folders
    whose owner is gone (killed before it could clean up) are removed first."""
    remove_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    (workdir / _OWNER_FILE).write_text(owner_token(), encoding="ascii")
    return workdir


def remove_stale_workdirs() -> None:
    """Remove the working folders whose owning process is gone."""
    for folder in Path(tempfile.gettempdir()).glob(WORKDIR_PREFIX + "*"):
        try:
            token = (folder / _OWNER_FILE).read_text(encoding="ascii")
        except OSError:
            continue  # not ours to judge (no owner file)
        if not owner_alive(token):
            shutil.rmtree(folder, ignore_errors=True)
