"""Multi-process data parallelism: the main job on 2 JAX processes x 2 fake CPU devices vs 1 x 4.

Each process is a real OS process running ``python -m facenet_jax.main`` that joins the run with
``jax.distributed.initialize`` (loopback coordinator on a free port) and feeds only its own half of
every global batch; cross-process collectives on CPU go through gloo (JAX's default
``jax_cpu_collectives_implementation``).

One launch covers the multi-host contract (compiles are the cost, so it is one test):
  * all processes restore a checkpoint written by a 1-process x 4-device run (other topology),
  * their steps equal the 1-process x 4-device steps (global mining, same global batches),
  * all processes save the next checkpoint through orbax, which a single process restores,
  * only process 0 writes metrics, config, evaluation and plots (each record once).
A second launch preempts one process with SIGTERM: every process saves the same step and exits.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import smoke
from facenet_jax import checkpoints, metric_logging, parallel, train
from facenet_jax.data import input_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
LOCAL_DEVICES = 2
# The run under test, pinned here (the asserted steps follow from them).
OVERRIDES = {
    "data.augment": (),
    "train.mining_scope": "global",
    "train.num_steps": 6,
    "train.checkpoint_every": 3,  # The processes resume from step 3...
    "train.log_every": 2,  # ...and log steps 4 and 6.
}
TIMEOUT_S = 400  # For the whole group; ~30-90 s normally. A hang (a process missing a
# collective) then fails the test with every process's log instead of blocking the suite.


def _free_loopback_port() -> int:
    """A free TCP port on 127.0.0.1; skips if this sandbox cannot open loopback sockets."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError as e:  # No loopback interface: no process here can host a coordinator.
        pytest.skip(f"cannot bind a TCP socket on 127.0.0.1 for the JAX coordinator: {e}")


class ProcessGroup:
    """Starts one OS process per command with ``LOCAL_DEVICES`` fake CPU devices each.

    ``wait`` returns every process's stdout. If one fails or the group runs past ``timeout``,
    all are killed and the test fails showing the tail of each process's stderr. Leaving the
    ``with`` block kills whatever still runs, so a failing test leaves no process behind.
    """

    def __init__(self, commands: list[list[str]], logdir: str):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
            PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
            # Same compile settings as this test session (conftest.py): launches are compile-bound.
            JAX_DISABLE_MOST_OPTIMIZATIONS=str(jax.config.read("jax_disable_most_optimizations")),
        )
        self.files, self.procs = [], []
        for i, cmd in enumerate(commands):
            out, err = (
                open(os.path.join(logdir, f"process_{i}.{kind}"), "w+")  # noqa: SIM115
                for kind in ("stdout", "stderr")
            )
            self.files.append((out, err))
            self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err))

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        for out, err in self.files:
            out.close()
            err.close()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def wait(self, timeout: float = TIMEOUT_S) -> list[str]:
        failed = None
        for i, p in enumerate(self.procs):
            try:
                if p.wait(timeout=timeout) != 0 and failed is None:
                    failed = f"process {i} exited with code {p.returncode}"
            except subprocess.TimeoutExpired:
                failed = f"process {i} still running after {timeout} s (hang?)"
                break
        self.kill()
        if failed:
            tails = "\n".join(
                f"--- process {i} stderr tail:\n{_read(err)[-3000:]}"
                for i, (_, err) in enumerate(self.files)
            )
            pytest.fail(f"{failed}\n{tails}")
        return [_read(out) for out, _ in self.files]


def _read(f) -> str:
    f.seek(0)
    return f.read()


def _config():
    """Smoke config, global mining, no augmentation.

    Augmentation is seeded by (seed, step, process_index) in input_pipeline, so with it the global
    batch would depend on the process count; without it the batch is a function of (seed, step).
    """
    config = smoke.get_config()
    for field, value in OVERRIDES.items():
        section, name = field.split(".")
        config[section][name] = value
    return config


def _main_command(workdir: str, port: int, process_id: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "facenet_jax.main",
        "--config=configs/smoke.py",
        *(f"--config.{k}={v if isinstance(v, str) else repr(v)}" for k, v in OVERRIDES.items()),
        f"--workdir={workdir}",
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={NUM_PROCESSES}",
        f"--process_id={process_id}",
    ]


def _leaves(state) -> dict[str, np.ndarray]:
    tree = {"params": state.params, "batch_stats": state.batch_stats}
    flat = jax.tree_util.tree_flatten_with_path(parallel.fetch(tree))[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def test_main_job_on_2_processes_x_2_devices_matches_1_process_x_4(tmp_path):
    assert jax.device_count() >= 4, "conftest.py must request 8 fake CPU devices"
    config = _config()
    resume_at, num_steps = config.train.checkpoint_every, config.train.num_steps
    workdir = str(tmp_path / "run")
    port = _free_loopback_port()

    # A step-3 checkpoint the processes cannot make up themselves: params from another seed.
    mesh = parallel.create_mesh(jax.devices()[:4])
    ds = input_pipeline.create_dataset(config)
    other_init = train.create_train_state(config, jax.random.key(config.seed + 1), ds.image_shape)
    state = parallel.replicate(other_init.replace(step=resume_at), mesh)
    manager = checkpoints.create_manager(workdir, config)
    checkpoints.save(manager, state)
    manager.close()
    checkpoints.write_config(config, workdir)
    template = jax.tree.map(lambda x: x.copy(), state)  # The step donates its input state.

    cmds = [_main_command(workdir, port, i) for i in range(NUM_PROCESSES)]
    with ProcessGroup(cmds, str(tmp_path)) as group:
        # Reference, while the processes start: 1 process x 4 devices from the same checkpoint.
        step_fn = train.make_train_step(config, mesh)
        batches = ds.train_batches(resume_at)
        for _ in range(resume_at, num_steps):
            state, _ = step_fn(state, parallel.shard_batch(next(batches), mesh))
        stdouts = group.wait()

    # Both processes restored step 3, trained to 6 and saved; restore it here on 1 process.
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps == [resume_at, num_steps]
    manager = checkpoints.create_manager(workdir, config)
    restored = checkpoints.restore_latest(manager, template, workdir)
    manager.close()
    assert int(restored.step) == num_steps
    want, got, start = _leaves(state), _leaves(restored), _leaves(template)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-3, atol=2e-5, err_msg=key)
    assert max(np.abs(want[k] - start[k]).max() for k in want) > 1e-4, "the steps must train"

    # Only process 0 wrote files and printed the summary: each record once.
    assert "ROC AUC" in stdouts[0] and "ROC AUC" not in stdouts[1]
    records = metric_logging.read_metrics(workdir)
    assert [r["step"] for r in records if "loss" in r] == [4, 6]
    assert [r["step"] for r in records if "eval/auc" in r] == [num_steps]
    with open(os.path.join(workdir, "eval.json")) as f:
        assert json.load(f)["trained"]["step"] == num_steps
    for name in ("roc.png", "eval_baseline.json", "config.json"):
        assert os.path.exists(os.path.join(workdir, name)), name


@pytest.mark.parametrize(
    "args,env,expected",
    [
        (("", 0, -1), {}, None),  # One plain process: no distributed system.
        (
            ("10.0.0.1:1234", 4, 2),
            {},
            {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2},
        ),
        (
            ("", 0, -1),
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
            {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1},
        ),
        (("auto", 0, -1), {}, {}),  # Cloud TPU VM slices: JAX asks the metadata server.
        (("", 0, -1), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, {}),
        (("", 0, -1), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
        (("", 0, -1), {"OMPI_COMM_WORLD_SIZE": "2"}, {}),
        (("", 0, -1), {"TPU_WORKER_HOSTNAMES": "w0,w1"}, {}),
    ],
)
def test_initialize_distributed_reads_flags_env_and_launchers(monkeypatch, args, env, expected):
    """Which ``jax.distributed.initialize`` call each launch situation makes (None: no call)."""
    for name in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    parallel.initialize_distributed(*args)
    assert calls == ([] if expected is None else [expected])


def test_sigterm_on_one_process_stops_every_process_at_the_same_saved_step(tmp_path):
    """Preemption of one host: JAX's preemption service tells every process, all save the same
    step through orbax and exit 143; each step is logged once."""
    workdir = str(tmp_path / "run")
    port = _free_loopback_port()
    cmds = [
        [
            *_main_command(workdir, port, i),
            "--config.train.num_steps=100000",
            "--config.train.checkpoint_every=100000",
            "--config.train.log_every=1",
            "--config.eval.baseline=False",
        ]
        for i in range(NUM_PROCESSES)
    ]
    with ProcessGroup(cmds, str(tmp_path)) as group:
        deadline = time.time() + TIMEOUT_S
        while time.time() < deadline:
            if any(p.poll() is not None for p in group.procs):
                pytest.fail("a process exited before the signal:\n" + _read(group.files[0][1]))
            path = os.path.join(workdir, "metrics.jsonl")
            if os.path.exists(path) and len(metric_logging.read_metrics(workdir)) >= 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run did not log 3 steps in time")
        group.procs[1].send_signal(signal.SIGTERM)  # Only process 1 is preempted.
        codes = [p.wait(timeout=TIMEOUT_S) for p in group.procs]
        stderrs = [_read(err) for _, err in group.files]
    assert codes == [128 + signal.SIGTERM] * NUM_PROCESSES, "\n".join(s[-2000:] for s in stderrs)
    saved = [int(re.search(r"saved checkpoint step (\d+)", s).group(1)) for s in stderrs]
    assert saved[0] == saved[1], saved
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps == [saved[0]]
    logged = [r["step"] for r in metric_logging.read_metrics(workdir)]
    assert logged == list(range(1, saved[0] + 1))
