"""The workdir lock: exclusive, names its holder, takes over stale locks, keeps others' locks."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from facenet_jax import workdir


def _write_lock(path, **fields):
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "purpose": "train",
        "since": time.time(),
        "token": "t0",
        "start_ticks": None,
    }
    info.update(fields)
    os.makedirs(path, exist_ok=True)
    with open(workdir.lock_path(path), "w") as f:
        json.dump(info, f)


def _dead_pid() -> int:
    """The pid of a process that ran and was reaped (no longer exists)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_holds_pid_and_host_and_is_released(tmp_path):
    run = str(tmp_path / "run")
    with workdir.lock(run, purpose="train"):
        info = workdir.read_lock(run)
        assert info.pid == os.getpid() and info.host == socket.gethostname()
        assert info.purpose == "train" and info.is_alive()
    assert not os.path.exists(workdir.lock_path(run))
    assert workdir.holder(run) is None


def test_second_holder_is_refused_naming_the_pid(tmp_path):
    run = str(tmp_path / "run")
    with workdir.lock(run):
        with pytest.raises(workdir.WorkdirLockedError, match=f"pid {os.getpid()} on host"):
            workdir.WorkdirLock(run, purpose="train").acquire()
    workdir.WorkdirLock(run).acquire().release()  # Free again.


def test_lock_held_by_another_live_process(tmp_path):
    run = str(tmp_path / "run")
    code = (
        "import sys, time; from facenet_jax import workdir; "
        f"workdir.WorkdirLock({run!r}, 'train').acquire(); print('locked', flush=True); "
        "time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir.WorkdirLockedError, match=f"pid {holder.pid} "):
            workdir.check_unlocked(run, purpose="evaluate")
        with pytest.raises(workdir.WorkdirLockedError, match=f"pid {holder.pid} "):
            workdir.WorkdirLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    # kill -9: the lock file stays, its pid is gone; the next run takes it over.
    assert workdir.read_lock(run).pid == holder.pid
    workdir.check_unlocked(run)
    with workdir.lock(run):
        assert workdir.read_lock(run).pid == os.getpid()


def test_stale_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path, caplog):
    run = str(tmp_path / "run")
    pid = _dead_pid()
    _write_lock(run, pid=pid)
    with caplog.at_level(logging.WARNING), workdir.lock(run):
        assert workdir.read_lock(run).pid == os.getpid()
    assert any(f"pid {pid}" in r.getMessage() and "stale" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(run)) == []  # Nothing left behind: no lock, no moved-aside copy.


def test_reused_pid_is_recognised_by_its_start_time(tmp_path):
    run = str(tmp_path / "run")
    ticks = workdir._start_ticks(os.getpid())
    if ticks is None:
        pytest.skip("no /proc on this platform")
    # Our own pid, but started at another time: the holder died and the pid was reused.
    _write_lock(run, pid=os.getpid(), start_ticks=ticks - 1)
    assert workdir.read_lock(run).is_alive() is False
    with workdir.lock(run):
        assert workdir.read_lock(run).start_ticks == ticks


def test_lock_of_another_host_is_respected_and_names_the_file(tmp_path):
    run = str(tmp_path / "run")
    _write_lock(run, host="another-host", pid=12345)
    with pytest.raises(workdir.WorkdirLockedError) as e:
        workdir.WorkdirLock(run).acquire()
    assert "pid 12345 on host another-host" in str(e.value)
    assert workdir.lock_path(run) in str(e.value)  # What to delete if that run is gone.


def test_release_never_removes_another_process_lock(tmp_path):
    run = str(tmp_path / "run")
    handle = workdir.WorkdirLock(run).acquire()
    _write_lock(run, token="someone-else")  # E.g. taken over after we were presumed dead.
    handle.release()
    assert workdir.read_lock(run).token == "someone-else"


def test_lock_disabled_holds_nothing(tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    with workdir.lock(run, enabled=False):
        assert workdir.read_lock(run) is None
