"""Data-parallel step on 8 fake CPU devices (see conftest.py) against one device."""

import jax
import numpy as np
import pytest

from configs import smoke
from facenet_jax import parallel, train
from facenet_jax.data import input_pipeline


def _run_steps(config, devices, num_steps=2, *, with_class_weights=False):
    mesh = parallel.create_mesh(devices)
    ds = input_pipeline.create_dataset(config)
    classes = train.dataset_classes(ds)
    state = parallel.replicate(
        train.create_train_state(
            config, jax.random.key(0), ds.image_shape, num_classes=len(classes)
        ),
        mesh,
    )
    step = train.make_train_step(config, mesh)
    batches = ds.train_batches(0)
    history = []
    for _ in range(num_steps):
        batch = next(batches)
        batch["label"] = train.to_class_labels(batch["label"], classes)
        state, metrics = step(state, parallel.shard_batch(batch, mesh))
        history.append(parallel.fetch(metrics))
    params = parallel.fetch(state.params)
    if with_class_weights:
        params = {"model": params, "class_weights": parallel.fetch(state.class_weights)}
    return params, parallel.fetch(state.batch_stats), history


@pytest.fixture(scope="module")
def config():
    config = smoke.get_config()
    config.data.identities_per_batch = 4
    config.data.images_per_identity = 8  # 32 rows: 4 per device on 8 devices.
    config.train.schedule = "constant"
    # SGD: the update is linear in the gradient, so parameters compare at float tolerance (Adam's
    # first steps are ~lr * sign(g) and amplify rounding differences of near-zero gradients).
    config.train.optimizer = "sgd"
    config.train.learning_rate = 0.1
    return config


@pytest.mark.parametrize("mining", ["semi_hard", "batch_hard", "batch_all"])
def test_global_mining_on_8_devices_equals_one_device(config, mining):
    assert jax.device_count() >= 8, "conftest.py must request 8 fake CPU devices"
    config = config.copy_and_resolve_references()
    config.train.mining = mining
    config.train.mining_scope = "global"
    # One update from the same state and global batch: only the reduction order differs.
    # (Over several steps float rounding can flip a near-tie in semi-hard mining, a
    # discontinuity, so later steps are not expected to agree to float tolerance.)
    p1, s1, h1 = _run_steps(config, jax.devices()[:1], num_steps=1)
    p8, s8, h8 = _run_steps(config, jax.devices()[:8], num_steps=1)
    for key in ("loss", "fraction_active", "mean_pos_dist", "mean_neg_dist", "grad_norm"):
        np.testing.assert_allclose(h8[0][key], h1[0][key], rtol=1e-4, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "loss,weights", [("cosface", ()), ("triplet+arcface", (1.0, 0.5)), ("softmax", ())]
)
def test_margin_softmax_on_8_devices_equals_one_device(config, loss, weights):
    """The class-weight matrix W and the network after one update of the global batch: 8 devices
    (each its own rows, count pooled, gradients psum-ed) equal one device running all rows."""
    config = config.copy_and_resolve_references()
    config.train.loss = loss
    config.train.loss_weights = weights
    config.train.margin_m = 0.5 if "arcface" in loss else 0.35
    p1, s1, h1 = _run_steps(config, jax.devices()[:1], num_steps=1, with_class_weights=True)
    p8, s8, h8 = _run_steps(config, jax.devices()[:8], num_steps=1, with_class_weights=True)
    keys = ("loss", "margin_loss", "triplet_loss", "margin_accuracy", "margin_mean_target_cos")
    for key in (*keys, "mean_pos_dist", "grad_norm"):
        np.testing.assert_allclose(h8[0][key], h1[0][key], rtol=1e-4, atol=1e-6, err_msg=key)
    # The objective is the weighted sum of the logged terms; W moved (it is trained).
    terms = train.loss_terms(config.train)
    want = sum(
        w * h1[0]["triplet_loss" if n == "triplet" else "margin_loss"] for n, w in terms.items()
    )
    np.testing.assert_allclose(h1[0]["loss"], want, rtol=1e-6)
    assert 0.0 <= h1[0]["margin_accuracy"] <= 1.0 and h1[0]["margin_loss"] > 0
    ds = input_pipeline.create_dataset(config)
    w0 = train.create_train_state(
        config, jax.random.key(0), ds.image_shape, num_classes=len(train.dataset_classes(ds))
    ).class_weights
    assert np.abs(p1["class_weights"] - np.asarray(w0)).max() > 1e-6
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_local_mining_sees_fewer_negatives_than_global(config):
    """Local scope mines inside each device's 4 rows (one identity): no negatives, zero loss."""
    config = config.copy_and_resolve_references()
    config.train.mining_scope = "local"
    _, _, h = _run_steps(config, jax.devices()[:8], num_steps=1)
    assert h[0]["loss"] == 0.0 and h[0]["num_valid"] == 0
    config.train.mining_scope = "global"
    _, _, h = _run_steps(config, jax.devices()[:8], num_steps=1)
    assert h[0]["loss"] > 0 and h[0]["num_valid"] > 0


def test_batch_not_divisible_by_devices_names_the_fields(config):
    config = config.copy_and_resolve_references()
    config.data.identities_per_batch = 3  # 24 rows on 16 devices? use 5 devices below
    mesh = parallel.create_mesh(jax.devices()[:5])
    with pytest.raises(ValueError, match="identities_per_batch"):
        train.make_train_step(config, mesh)


def test_preemption_watcher_stops_at_the_next_step_and_a_second_ctrl_c_aborts():
    import os
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with parallel.PreemptionWatcher() as watcher:
        assert not watcher.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)  # Recorded, not fatal.
        assert watcher.reached(2) and watcher.signal_name == "SIGTERM"
    with parallel.PreemptionWatcher() as watcher:
        os.kill(os.getpid(), signal.SIGINT)
        assert watcher.reached(1) and watcher.signal_number == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again: the user does not want to wait.
    assert {s: signal.getsignal(s) for s in before} == before  # Handlers restored.
