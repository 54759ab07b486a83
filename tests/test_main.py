"""The main job as a user runs it (subprocesses): one-line errors, --help, quiet output, SIGTERM."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from configs import smoke
from facenet_jax import metric_logging, train, workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO_LINE = re.compile(r"^I\d{4} ", re.MULTILINE)  # absl's INFO prefix, e.g. "I1201 02:27:55".


def _env(devices: int = 1) -> dict:
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )


def _main(*args, cwd=REPO, devices=1, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "facenet_jax.main", *args],
        cwd=cwd,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line_error(out) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    return lines[0]


def test_misspelt_override_is_one_line_with_a_suggestion(tmp_path):
    out = _main("--config=configs/smoke.py", f"--workdir={tmp_path}", "--config.train.marginn=0.3")
    assert out.returncode == 2
    line = _one_line_error(out)
    assert "--config.train.marginn" in line and "did you mean --config.train.margin" in line
    assert not os.listdir(tmp_path)  # Nothing started.


def test_wrong_config_path_is_one_line_with_a_suggestion(tmp_path):
    out = _main("--config=configs/smok.py", f"--workdir={tmp_path}")
    assert out.returncode == 2
    line = _one_line_error(out)
    assert "--config=configs/smok.py: no such file" in line and "configs/smoke.py" in line


def test_bad_override_value_is_one_line(tmp_path):
    out = _main("--config=configs/smoke.py", f"--workdir={tmp_path}", "--config.train.margin=abc")
    assert out.returncode == 2
    assert "config.train.margin" in _one_line_error(out)


def test_config_file_loads_from_any_directory(tmp_path):
    """A config importing its siblings (``from configs import default``) outside the repo."""
    out = _main(f"--config={REPO}/configs/smok.py", f"--workdir={tmp_path}", cwd=str(tmp_path))
    assert out.returncode == 2 and f"{REPO}/configs/smoke.py" in _one_line_error(out)
    out = _main("--help", f"--config={REPO}/configs/smoke.py", cwd=str(tmp_path))
    assert out.returncode == 0 and "model.width = 8" in out.stdout  # smoke.py's value.


def test_help_lists_config_fields_with_their_comments_and_exits_0():
    out = _main("--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--workdir" in out.stdout and "--config" in out.stdout
    lines = {line.split("=")[0].strip(): line for line in out.stdout.splitlines() if " = " in line}
    assert "alpha in ||f(a)-f(p)||^2" in lines["train.margin"]
    assert "stop (exit 1) | skip the step" in lines["train.on_nonfinite"]
    assert "Backbone, looked up in facenet_jax.models.MODELS" in out.stdout
    assert {"seed", "data.source", "model.name", "eval.num_pairs"} <= set(lines)


def _hold_lock(run: str, pid: int) -> None:
    os.makedirs(run, exist_ok=True)
    info = {"pid": pid, "host": socket.gethostname(), "purpose": "train", "since": time.time()}
    with open(workdir.lock_path(run), "w") as f:
        json.dump({**info, "token": "held"}, f)


def test_runtime_user_error_is_one_line_and_verbosity_shows_the_traceback(tmp_path):
    run = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        _hold_lock(run, holder.pid)
        out = _main("--config=configs/smoke.py", f"--workdir={run}")
        assert out.returncode == 1
        line = _one_line_error(out)
        assert f"in use by pid {holder.pid}" in line and "--verbosity=1" in line
        out = _main("--config=configs/smoke.py", f"--workdir={run}", "--verbosity=1")
        assert out.returncode == 1 and "Traceback" in out.stderr
        assert "WorkdirLockedError" in out.stderr
    finally:
        holder.kill()
        holder.wait()


def test_main_job_is_quiet_and_prints_its_result_once(tmp_path):
    """The README's main command on the smoke config, on 8 fake devices."""
    out = _main(
        "--config=configs/smoke.py",
        f"--workdir={tmp_path / 'cli'}",
        "--config.train.margin=0.3",
        devices=8,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("verification on split") == 1
    assert out.stdout.count("ROC AUC") == 2  # The untrained and the trained network, once each.
    assert not INFO_LINE.search(out.stderr), out.stderr[-3000:]  # No library INFO logs.
    assert len(out.stderr.splitlines()) < 5, out.stderr[-3000:]
    with open(tmp_path / "cli" / "config.json") as f:
        assert json.load(f)["train"]["margin"] == 0.3
    assert not os.path.exists(workdir.lock_path(str(tmp_path / "cli")))


def _wait_for_records(run: str, n: int, proc, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        try:
            if len(metric_logging.read_metrics(run)) >= n:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    pytest.fail(f"no {n} metric records after {timeout} s")


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    """A preempted run: SIGTERM mid-training saves the step it finished, flushes the metrics,
    says so and exits 143; meanwhile a second run on the workdir is refused naming its pid."""
    run = str(tmp_path / "run")
    args = [
        "--config=configs/smoke.py",
        f"--workdir={run}",
        "--config.train.num_steps=100000",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=100000",
        "--config.eval.baseline=False",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "facenet_jax.main", *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_records(run, 3, proc)
        # The second run with another width: refused before it writes anything.
        other = smoke.get_config()
        other.model.width = 16
        with pytest.raises(workdir.WorkdirLockedError, match=f"in use by pid {proc.pid} "):
            train.train_and_evaluate(other, run)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    match = re.search(r"stopped by SIGTERM: saved checkpoint step (\d+) in ", stderr)
    assert match, stderr[-3000:]
    step = int(match.group(1))
    assert "Traceback" not in stderr and "verification" not in stdout  # No evaluation reported.
    steps = sorted(int(s) for s in os.listdir(os.path.join(run, "checkpoints")) if s.isdigit())
    assert steps == [step]
    assert [r["step"] for r in metric_logging.read_metrics(run)] == list(range(1, step + 1))
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["model"]["width"] == 8  # The refused run changed nothing.
    assert not os.path.exists(workdir.lock_path(run))
