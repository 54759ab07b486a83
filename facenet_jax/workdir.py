"""The workdir lock: one process at a time writes a run directory.

Two runs on one workdir interleave ``metrics.jsonl`` and, with different configs, leave
``config.json`` describing one network and ``checkpoints/`` holding another. The training process
therefore holds ``WORKDIR/LOCK`` for its whole life, and any other writer into a workdir (the CLI's
``evaluate`` writing reports next to a run) takes or checks the same lock:

    with workdir.lock(path, purpose="train"):   # raises WorkdirLockedError naming the holder
        ...

The lock file is created with ``O_CREAT | O_EXCL`` (atomic on local file systems and NFS v3+) and
holds one JSON object: pid, host, purpose, start time and a random token. A lock whose pid no
longer runs on this host (a run killed with ``kill -9``) is stale: the next run takes it over with
a warning. A lock from another host cannot be checked and is respected; its message says which
file to delete if that run is known to be gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator

from absl import logging

LOCK_NAME = "LOCK"
_READ_RETRIES = 20  # A just-created lock may be empty for a moment while its holder writes it.


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock."""


@dataclasses.dataclass(frozen=True)
class LockInfo:
    """Who holds a workdir: pid and host of the process, what for, since when (unix time)."""

    pid: int
    host: str
    purpose: str
    since: float
    token: str
    start_ticks: int | None = None  # The pid's start time on this host (tells a reused pid apart).

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on host {self.host} ({self.purpose}, since {when})"

    def is_alive(self) -> bool | None:
        """True/False for a process on this host; None when the host is another one (unknown)."""
        if self.host != socket.gethostname():
            return None
        if not _pid_running(self.pid):
            return False
        if self.start_ticks is not None:
            ticks = _start_ticks(self.pid)
            if ticks is not None and ticks != self.start_ticks:
                return False  # The pid was reused by another process after the holder died.
        return True


def lock_path(workdir: str) -> str:
    return os.path.join(workdir, LOCK_NAME)


def read_lock(workdir: str) -> LockInfo | None:
    """The lock's content, or None when the workdir is not locked."""
    path = lock_path(workdir)
    for _ in range(_READ_RETRIES):
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            return LockInfo(**json.loads(text))
        except (json.JSONDecodeError, TypeError):
            time.sleep(0.05)  # Being written (created empty, then filled) or damaged.
    return LockInfo(pid=-1, host="?", purpose=f"unreadable lock file {path}", since=0.0, token="")


def holder(workdir: str) -> LockInfo | None:
    """The live (or unverifiable, on another host) holder of the workdir's lock, else None."""
    info = read_lock(workdir)
    if info is None or info.is_alive() is False:
        return None
    return info


def check_unlocked(workdir: str, purpose: str = "write") -> None:
    """Raises WorkdirLockedError if another live process holds ``workdir``.

    For writers that only add files next to a run and do not need the lock for long; a writer that
    must exclude training for its whole duration should hold ``lock(workdir)`` instead.
    """
    info = holder(workdir)
    if info is not None and not _is_this_process(info):
        raise WorkdirLockedError(_locked_message(workdir, info, purpose))


class WorkdirLock:
    """``WORKDIR/LOCK`` held by this process between ``acquire`` and ``release``."""

    def __init__(self, workdir: str, purpose: str = "train"):
        self.workdir = workdir
        self.purpose = purpose
        self.path = lock_path(workdir)
        self.info: LockInfo | None = None

    def acquire(self) -> WorkdirLock:
        os.makedirs(self.workdir, exist_ok=True)
        mine = LockInfo(
            pid=os.getpid(),
            host=socket.gethostname(),
            purpose=self.purpose,
            since=time.time(),
            token=uuid.uuid4().hex,
            start_ticks=_start_ticks(os.getpid()),
        )
        for _ in range(10):  # Each pass either creates the lock or removes a stale one.
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = read_lock(self.workdir)
                if info is None:
                    continue  # Released meanwhile.
                alive = info.is_alive()
                if alive is False:
                    _take_over(self.path, info)
                    continue
                raise WorkdirLockedError(
                    _locked_message(self.workdir, info, self.purpose)
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(dataclasses.asdict(mine), f)
                f.flush()
                os.fsync(f.fileno())
            self.info = mine
            return self
        raise WorkdirLockedError(f"could not lock {self.path}: it keeps changing hands")

    def release(self) -> None:
        """Removes the lock file if it is still this process's (never another's)."""
        if self.info is None:
            return
        current = read_lock(self.workdir)
        if current is not None and current.token == self.info.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.info = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire() if self.info is None else self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def lock(workdir: str, purpose: str = "train", enabled: bool = True) -> Iterator[WorkdirLock]:
    """Holds ``WORKDIR/LOCK`` for the ``with`` block; ``enabled=False`` holds nothing (used by
    the non-chief processes of a multi-process run, whose process 0 holds the lock)."""
    handle = WorkdirLock(workdir, purpose)
    if enabled:
        handle.acquire()
    try:
        yield handle
    finally:
        handle.release()


def _locked_message(workdir: str, info: LockInfo, purpose: str) -> str:
    where = f"{workdir!r} is in use by {info.describe()}"
    if info.is_alive() is None:
        return (
            f"{where}: cannot {purpose} it. That process runs on another host; if it is gone, "
            f"delete {lock_path(workdir)}"
        )
    return f"{where}: cannot {purpose} it; wait for it to finish or use another --workdir"


def _take_over(path: str, stale: LockInfo) -> None:
    """Moves a stale lock aside, unless another process replaced it meanwhile."""
    aside = f"{path}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # Another process took it over first.
    try:
        with open(aside) as f:
            moved = json.loads(f.read() or "{}")
    except (OSError, json.JSONDecodeError):
        moved = {}
    if moved.get("token") != stale.token:  # We moved a fresh lock: put it back if nobody else is.
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    else:
        logging.warning(
            "taking over the stale lock %s of %s: that process is no longer running",
            path,
            stale.describe(),
        )
    os.unlink(aside)


def _is_this_process(info: LockInfo) -> bool:
    return info.host == socket.gethostname() and info.pid == os.getpid()


def _pid_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Runs, as another user.
        return True
    return _proc_stat(pid)[0] != "Z"  # A zombie (exited, not yet reaped) no longer runs.


def _proc_stat(pid: int) -> tuple[str | None, int | None]:
    """(state, start time in clock ticks since boot) from Linux /proc, else (None, None)."""
    if not sys.platform.startswith("linux"):
        return None, None
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None, None
    # The command name (field 2) may hold spaces: split after its ')'. Then field 3 is the state
    # and field 22 the start time.
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def _start_ticks(pid: int) -> int | None:
    return _proc_stat(pid)[1]
