"""Train step, end-to-end smoke run, resume, and config validation."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import smoke
from facenet_jax import checkpoints, metric_logging, parallel, train
from facenet_jax.data import input_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_steps_lower_the_loss_on_a_fixed_batch():
    config = smoke.get_config()
    config.train.learning_rate = 3e-3
    config.train.schedule = "constant"
    mesh = parallel.create_mesh(jax.devices()[:1])
    ds = input_pipeline.create_dataset(config)
    batch = parallel.shard_batch(next(ds.train_batches(0)), mesh)
    state = parallel.replicate(
        train.create_train_state(config, jax.random.key(0), ds.image_shape), mesh
    )
    step = train.make_train_step(config, mesh)
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 8
    assert losses[-1] < 0.7 * losses[0], losses
    for key in ("fraction_active", "mean_pos_dist", "mean_neg_dist", "learning_rate"):
        assert np.isfinite(float(metrics[key])), key


def test_end_to_end_smoke_run_writes_outputs_and_resumes(tmp_path):
    config = smoke.get_config()
    workdir = str(tmp_path / "run")
    first = train.train_and_evaluate(config, workdir)
    for name in ("metrics.jsonl", "eval.json", "config.json", "roc.png", "eval_baseline.json"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert os.path.isdir(os.path.join(workdir, "tensorboard"))
    records = metric_logging.read_metrics(workdir)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    for r in train_records:
        assert {"fraction_active", "mean_pos_dist", "mean_neg_dist", "images_per_sec"} <= set(r)
    with open(os.path.join(workdir, "eval.json")) as f:
        result = json.load(f)
    assert 0.0 <= result["trained"]["accuracy"] <= 1.0
    assert result["trained"]["step"] == 6 == first["step"]
    assert "untrained" in result

    # Resume: raise num_steps; the run continues from the step-6 checkpoint, not from 0.
    config.train.num_steps = 9
    resumed = train.train_and_evaluate(config, workdir)
    assert resumed["step"] == 9
    steps = [r["step"] for r in metric_logging.read_metrics(workdir) if "loss" in r]
    assert steps == [2, 4, 6, 8, 9]


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    """Interrupt at the step-3 checkpoint, restart: same final parameters as one clean run."""
    config = smoke.get_config()
    config.eval.baseline = False
    full = str(tmp_path / "full")
    train.train_and_evaluate(config, full)
    part = str(tmp_path / "part")
    config.train.num_steps = 3
    train.train_and_evaluate(config, part)
    config.train.num_steps = 6
    train.train_and_evaluate(config, part)
    a = _restore_params(full, config)
    b = _restore_params(part, config)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _restore_params(workdir, config):
    manager = checkpoints.create_manager(workdir, config)
    state = train.create_train_state(config, jax.random.key(0), (16, 16, 1))
    state = checkpoints.restore_latest(manager, state, workdir)
    assert int(state.step) == 6
    return state.params


def test_incompatible_checkpoint_is_refused(tmp_path):
    config = smoke.get_config()
    config.train.num_steps = 3
    config.eval.baseline = False
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    config.model.embedding_dim = 32
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match="config.model.embedding_dim"):
        train.train_and_evaluate(config, workdir)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("train.mining", "hardestest", "config.train.mining"),
        ("train.optimizer", "lamb2", "config.train.optimizer"),
        ("train.mining_scope", "galaxy", "config.train.mining_scope"),
        ("data.images_per_identity", 1, "images_per_identity"),
        ("model.name", "vgg99", "config.model.name"),
    ],
)
def test_bad_config_fails_at_startup_naming_the_field(field, value, match):
    config = smoke.get_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=match):
        train.validate_config(config)


def test_main_job_cli_runs_and_prints_verification(tmp_path):
    """The README's main command on the smoke config, as a subprocess on 8 fake devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "facenet_jax.main",
            "--config=configs/smoke.py",
            f"--workdir={tmp_path / 'cli'}",
            "--config.train.margin=0.3",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ROC AUC" in out.stdout and "untrained" in out.stdout
    with open(tmp_path / "cli" / "config.json") as f:
        assert json.load(f)["train"]["margin"] == 0.3


def test_collapse_message_flags_only_a_collapsed_embedding():
    # Logged metrics of real default-config runs (docs/ablations.md): batch_hard at step 50, and
    # semi_hard at step 50.
    collapsed = {"mean_pos_dist": 0.0028, "mean_neg_dist": 0.0013, "fraction_active": 1.0}
    healthy = {"mean_pos_dist": 0.53, "mean_neg_dist": 0.71, "fraction_active": 0.68}
    message = train.collapse_message(collapsed)
    assert message is not None and "collapsed" in message and "semi_hard" in message
    assert train.collapse_message(healthy) is None
    # Positives merged but negatives apart is not a collapse; nor is a batch with nothing valid.
    assert train.collapse_message({**collapsed, "mean_neg_dist": 0.5}) is None
    assert train.collapse_message({**collapsed, "num_valid": 0}) is None
