"""Training and evaluation: ``create_train_state``, ``train_step``, ``train_and_evaluate``.

The step is a pure function of ``(state, batch)``. It runs data-parallel on a 1-D device mesh with
``jax.shard_map`` under ``jax.jit`` (the pmap model): parameters replicated, the batch split along
``parallel.DATA_AXIS``, BatchNorm statistics synchronised, gradients combined with a collective.

Mining scope (``config.train.mining_scope``):
  * ``local``: each device mines inside its own B_local rows; loss = mean over devices of the
    per-device losses, gradients ``pmean``-ed. Memory O(B_local^2) per device.
  * ``global``: each device all-gathers the B embeddings and labels of the global batch and mines
    its own B_local anchors against all of them. With L_d = sum of device d's terms / (global
    count), the global loss is sum_d L_d, exactly the loss of one device running the whole batch,
    and gradients are ``psum``-ed (the all-gather's transpose routes each embedding's cotangent
    back to the device that produced it). Memory O(B x B_local) per device.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from jax import lax
from jax.sharding import PartitionSpec as P

from facenet_jax import checkpoints, inference, losses, metric_logging, models, parallel
from facenet_jax.data import input_pipeline
from facenet_jax.evaluate import report

AXIS = parallel.DATA_AXIS
MINING_SCOPES = ("local", "global")


class TrainState(train_state.TrainState):
    """step, params, opt_state (from flax) plus BatchNorm running statistics."""

    batch_stats: Any = None


# ----------------------------------------------------------------------------- config checks


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the field and the allowed values, before anything is compiled."""
    t, d = config.train, config.data
    if t.mining not in losses.STRATEGIES:
        raise ValueError(
            f"config.train.mining: unknown strategy {t.mining!r}; "
            f"allowed: {list(losses.STRATEGIES)}"
        )
    if t.mining_scope not in MINING_SCOPES:
        raise ValueError(
            f"config.train.mining_scope: {t.mining_scope!r}; allowed: {list(MINING_SCOPES)}"
        )
    if t.optimizer not in OPTIMIZERS:
        raise ValueError(f"config.train.optimizer: {t.optimizer!r}; allowed: {list(OPTIMIZERS)}")
    if t.schedule not in SCHEDULES:
        raise ValueError(f"config.train.schedule: {t.schedule!r}; allowed: {list(SCHEDULES)}")
    if d.images_per_identity < 2:
        raise ValueError(
            f"config.data.images_per_identity (K) must be >= 2 so every anchor has a positive, "
            f"got {d.images_per_identity}"
        )
    if d.identities_per_batch < 2:
        raise ValueError(
            "config.data.identities_per_batch (P) must be >= 2 so anchors have negatives, "
            f"got {d.identities_per_batch}"
        )
    for field in ("num_steps", "log_every", "checkpoint_every"):
        if t[field] < 1:
            raise ValueError(f"config.train.{field} must be >= 1, got {t[field]}")
    if t.margin < 0:
        raise ValueError(f"config.train.margin must be >= 0, got {t.margin}")
    if d.image_size < 8:
        raise ValueError(f"config.data.image_size must be >= 8, got {d.image_size}")
    if d.channels not in (1, 3):
        raise ValueError(f"config.data.channels must be 1 or 3, got {d.channels}")
    models.create_model(config.model)  # Checks model name, dtype and sizes.


# ----------------------------------------------------------------------------- optimiser


def _schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    t = config.train
    return SCHEDULES[t.schedule](t)


SCHEDULES = {
    "constant": lambda t: optax.constant_schedule(t.learning_rate),
    "cosine": lambda t: optax.cosine_decay_schedule(t.learning_rate, t.num_steps),
    "warmup_cosine": lambda t: optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, min(t.warmup_steps, t.num_steps - 1), max(t.num_steps, 2)
    ),
}

OPTIMIZERS = {
    "adam": lambda t, lr: optax.adam(lr),
    "adamw": lambda t, lr: optax.adamw(lr, weight_decay=t.weight_decay),
    "sgd": lambda t, lr: optax.chain(
        optax.add_decayed_weights(t.weight_decay), optax.sgd(lr, momentum=0.9, nesterov=True)
    ),
}


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    t = config.train
    tx = OPTIMIZERS[t.optimizer](t, _schedule(config))
    if t.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), tx)
    return tx


# ----------------------------------------------------------------------------- state


def create_train_state(
    config: ml_collections.ConfigDict, rng: jax.Array, image_shape: tuple[int, int, int]
) -> TrainState:
    """Initialises params and BatchNorm statistics for images [1, H, W, C]."""
    model = models.create_model(config.model, bn_axis_name=AXIS)
    init_model = models.create_model(config.model)  # Init runs outside shard_map: no BN axis.
    variables = jax.jit(functools.partial(init_model.init, train=False))(
        rng, jnp.zeros((1, *image_shape), jnp.float32)
    )
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=create_optimizer(config),
    )


# ----------------------------------------------------------------------------- update step


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    config: ml_collections.ConfigDict,
    axis_name: str = AXIS,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on this device's rows of the global PK batch (runs inside shard_map).

    Args:
      state: replicated train state.
      batch: ``image`` [B_local, H, W, C] float32, ``label`` [B_local] int32 (-1 = ignore).

    Returns:
      The new state and replicated scalar metrics (loss, fraction of active triplets, mean
      positive/negative distance, gradient and parameter norms, learning rate).
    """
    t = config.train
    images, labels = batch["image"], batch["label"]
    b_local = labels.shape[0]
    key = jax.random.fold_in(jax.random.key(config.seed), state.step)
    is_global = t.mining_scope == "global"
    if not is_global:
        key = jax.random.fold_in(key, lax.axis_index(axis_name))
    mining = dict(strategy=t.mining, margin=t.margin, squared=t.squared, soft=t.soft, key=key)

    def loss_fn(params):
        emb, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        if is_global:
            all_emb = lax.all_gather(emb, axis_name, tiled=True)
            all_labels = lax.all_gather(labels, axis_name, tiled=True)
            terms = losses.triplet_terms(
                all_emb,
                all_labels,
                anchor_start=lax.axis_index(axis_name) * b_local,
                num_anchors=b_local,
                **mining,
            )
            count = lax.psum(terms.count, axis_name)
        else:
            terms = losses.triplet_terms(emb, labels, **mining)
            count = terms.count
        loss = terms.loss_sum / jnp.maximum(count, 1)
        return loss, (terms, updates["batch_stats"])

    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # Global: L = sum_d L_d. Local: L = mean_d L_d. Diagnostics always pool all devices' terms.
    reduce = lax.psum if is_global else lax.pmean
    grads, loss = reduce(grads, axis_name), reduce(loss, axis_name)
    _, diagnostics = losses.terms_to_loss(jax.tree.map(lambda x: lax.psum(x, axis_name), terms))
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {
        **{k: jnp.asarray(v, jnp.float32) for k, v in diagnostics.items()},
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(state.params),
        "learning_rate": _schedule(config)(state.step),
    }
    return new_state, metrics


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """``train_step`` under shard_map (state replicated, batch split) under jit, state donated."""
    parallel.check_batch_size(
        config.data.identities_per_batch * config.data.images_per_identity,
        mesh,
        "config.data.identities_per_batch * config.data.images_per_identity",
    )
    step = jax.shard_map(
        functools.partial(train_step, config=config, axis_name=AXIS),
        mesh=mesh,
        in_specs=(P(), P(AXIS)),
        out_specs=(P(), P()),
        check_vma=False,
    )
    return jax.jit(step, donate_argnums=(0,))


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    state: TrainState,
    dataset: input_pipeline.FaceDataset,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
) -> report.Report:
    """The run's evaluation of ``state``: verification on same/different pairs of
    ``config.eval.split`` (``report.evaluate_split``), embedded by an ``inference.Embedder`` of
    the state's variables, the batch split over ``mesh``."""
    step = int(jax.device_get(state.step))
    embedder = inference.Embedder(config, state.params, state.batch_stats, step, mesh)
    return report.evaluate_split(embedder, dataset, config)


def _on_all_processes(flag: bool) -> bool:
    """Process 0's value of ``flag`` on every process, so all take the same branch."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


# ----------------------------------------------------------------------------- main loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates.

    Writes metrics.jsonl, tensorboard/, checkpoints/, config.json, eval.json (trained and
    untrained-baseline verification metrics) and roc.png / distances.png / embeddings.png.
    Returns the final evaluation metrics.
    """
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    checkpoints.check_compatible(config, workdir)
    is_chief = jax.process_index() == 0

    # --- mesh and input
    mesh = parallel.create_mesh()
    dataset = input_pipeline.create_dataset(config)
    global_batch = config.data.identities_per_batch * config.data.images_per_identity
    step_fn = make_train_step(config, mesh)  # Checks the batch splits over the devices (cheap).
    logging.info(
        "global batch %d = P %d x K %d on %d devices (%d per device), mining %s (%s)",
        global_batch,
        config.data.identities_per_batch,
        config.data.images_per_identity,
        mesh.devices.size,
        global_batch // mesh.devices.size,
        config.train.mining,
        config.train.mining_scope,
    )

    # --- model and state
    rng = jax.random.key(config.seed)
    state = parallel.replicate(create_train_state(config, rng, dataset.image_shape), mesh)
    manager = checkpoints.create_manager(workdir, config)

    baseline_path = os.path.join(workdir, "eval_baseline.json")
    baseline = None
    if config.eval.baseline:
        if _on_all_processes(os.path.exists(baseline_path)):
            with open(baseline_path) as f:
                baseline = json.load(f)
        else:  # The untrained network: same init as the run (same seed).
            untrained = evaluate(state, dataset, config, mesh)
            baseline = report.run_record(untrained) | {"roc": report.roc(untrained)}
            if is_chief:
                report.write_json(baseline_path, baseline)

    state = checkpoints.restore_latest(manager, state, workdir)
    start_step = int(jax.device_get(state.step))
    checkpoints.write_config(config, workdir)
    if start_step:
        logging.info("resumed from checkpoint at step %d", start_step)

    # --- update step
    writer = metric_logging.MetricWriter(workdir)
    t = config.train
    batches = dataset.train_batches(start_step, jax.process_index(), jax.process_count())

    progress = None
    if t.progress_bar and is_chief and start_step < t.num_steps:
        from tqdm.auto import tqdm

        progress = tqdm(total=t.num_steps, initial=start_step, desc="train", unit="step")

    # --- loop
    last_time, last_step = time.perf_counter(), start_step
    metrics = None
    collapse_warned = False
    for step in range(start_step + 1, t.num_steps + 1):
        batch = parallel.shard_batch(next(batches), mesh)
        state, metrics = step_fn(state, batch)
        if progress is not None:
            progress.update(1)
        if step % t.log_every == 0 or step == t.num_steps:
            m = parallel.fetch(metrics)
            if not np.isfinite(m["loss"]):
                raise FloatingPointError(f"loss is {m['loss']} at step {step}; stopping")
            now = time.perf_counter()
            m["images_per_sec"] = (step - last_step) * global_batch / (now - last_time)
            m["steps_per_sec"] = (step - last_step) / (now - last_time)
            last_time, last_step = now, step
            writer.write(step, m)
            if not collapse_warned and (message := collapse_message(m)):
                logging.warning("step %d: %s", step, message)
                collapse_warned = True
            if progress is not None:
                progress.set_postfix(
                    loss=f"{m['loss']:.4f}", active=f"{m['fraction_active']:.2f}", refresh=False
                )
            else:
                logging.info("step %d: %s", step, {k: round(float(v), 5) for k, v in m.items()})
        if step % t.checkpoint_every == 0 or step == t.num_steps:
            checkpoints.save(manager, state)
        if t.eval_every and step % t.eval_every == 0 and step != t.num_steps:
            m = report.run_record(evaluate(state, dataset, config, mesh))
            writer.write(step, {f"eval/{k}": v for k, v in m.items()})
    if progress is not None:
        progress.close()
    if hasattr(batches, "close"):  # Stops grain worker processes now, not at exit.
        batches.close()

    # --- final evaluation
    trained = evaluate(state, dataset, config, mesh)
    final = report.run_record(trained) | {"step": int(jax.device_get(state.step))}
    writer.write(final["step"], {f"eval/{k}": v for k, v in final.items() if k != "step"})
    writer.close()
    if is_chief:
        report.write_run(workdir, trained, final, baseline)
    manager.close()
    _log_summary(final, baseline, config)
    return final


COLLAPSE_DISTANCE = 1e-2  # Mean mined distances below this (both) mean f(x) is ~constant.


def collapse_message(metrics: dict[str, Any]) -> str | None:
    """A warning when the mined triplets say the embedding has collapsed to one point, else None.

    With unit-norm embeddings, distinct identities at a mean mined distance d(a,n) < 0.01 (and
    positives as close) mean f(x) is nearly constant: the failure of the hardest negatives that
    FaceNet describes (docs/ablations.md measures it for batch_hard and hardest).
    """
    pos, neg = float(metrics["mean_pos_dist"]), float(metrics["mean_neg_dist"])
    if max(pos, neg) >= COLLAPSE_DISTANCE or metrics.get("num_valid", 1) == 0:
        return None
    return (
        f"the embedding looks collapsed: mean mined d(a,p) = {pos:.2g} and d(a,n) = {neg:.2g} "
        f"(< {COLLAPSE_DISTANCE:g}), {float(metrics['fraction_active']):.0%} active; f(x) is "
        "nearly constant. Semi-hard mining (train.mining=semi_hard) avoids this; with "
        "hardest negatives, plain distances (train.squared=False) helped (docs/ablations.md)"
    )


def _log_summary(final: dict[str, Any], baseline: dict[str, Any] | None, config) -> None:
    text = report.summary(final, baseline, config.eval.split)
    logging.info("%s", text)
    if jax.process_index() == 0:
        print(text, flush=True)
