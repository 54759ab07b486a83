"""Training and evaluation: ``create_train_state``, ``train_step``, ``train_and_evaluate``.

The step is a pure function of ``(state, batch, learning_rate_fn)`` plus static settings bound with
``functools.partial`` where it is compiled (``make_train_step``). It runs data-parallel on a 1-D
device mesh with ``jax.shard_map`` under ``jax.jit`` (the pmap model): parameters replicated, the
batch split along ``parallel.DATA_AXIS``, BatchNorm statistics synchronised, gradients combined
with a collective.

Mining scope (``config.train.mining_scope``):
  * ``local``: each device mines inside its own B_local rows; loss = mean over devices of the
    per-device losses, gradients ``pmean``-ed. Memory O(B_local^2) per device.
  * ``global``: each device all-gathers the B embeddings and labels of the global batch and mines
    its own B_local anchors against all of them. With L_d = sum of device d's terms / (global
    count), the global loss is sum_d L_d, exactly the loss of one device running the whole batch,
    and gradients are ``psum``-ed (the all-gather's transpose routes each embedding's cotangent
    back to the device that produced it). Memory O(B x B_local) per device.

Objective (``config.train.loss``, docs/losses.md): the triplet loss, a margin-softmax loss
(softmax / NormFace / CosFace / ArcFace) over the C training identities, or a weighted sum of
both. The margin kinds classify each embedding with a class-weight matrix W [C, d] that lives in
the train state (``TrainState.class_weights``), is optimised with the network by the same
optimiser and is dropped at inference. Each row's margin loss depends only on that row and W, so
every device takes its own rows and the count is ``psum``-ed: the same global-batch result as the
triplet loss, in either scope. Batches carry class indices 0..C-1 (``training_classes``).

Faults (docs/reliability.md):
  * non-finite guard: the step computes one on-device flag over the loss, the gradients and the
    updated state; a non-finite update is not applied. ``train.on_nonfinite = "stop"`` ends the
    run (``NonFiniteError`` naming the step, the quantity and the last good checkpoint), ``"skip"``
    counts and goes on, up to ``train.max_nonfinite_skips`` in a row;
  * preemption: SIGTERM / SIGINT finish the current step, save a checkpoint and raise
    ``Preempted`` (``parallel.PreemptionWatcher``: the same step on every process);
  * the workdir is locked for the whole run (``facenet_jax.workdir``).
"""

from __future__ import annotations

import contextlib
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
from jax import lax
from jax.sharding import PartitionSpec as P

from facenet_jax import (
    checkpoints,
    inference,
    losses,
    metric_logging,
    models,
    parallel,
)
from facenet_jax import workdir as workdir_lib
from facenet_jax.data import folder, input_pipeline
from facenet_jax.data.spec import DataSpec
from facenet_jax.evaluate import report
from facenet_jax.faults import (
    NONFINITE_PARTS,
    NonFiniteError,
    NonFiniteGuard,
    Preempted,
    collapse_message,
    last_checkpoint,
)
from facenet_jax.objective import (
    LossSettings,
    dataset_classes,
    loss_terms,
    to_class_labels,
    training_classes,
    validate_margin_softmax,
)
from facenet_jax.train_state import (
    OPTIMIZERS,
    SCHEDULES,
    TrainState,
    create_learning_rate_fn,
    create_optimizer,
    create_train_state,
    split_trainable,
)

# The public API of training (Flax examples' shape); the pieces live in train_state, objective and
# faults.
__all__ = [
    "NONFINITE_PARTS",
    "LossSettings",
    "NonFiniteError",
    "Preempted",
    "TrainState",
    "collapse_message",
    "create_learning_rate_fn",
    "create_optimizer",
    "create_train_state",
    "dataset_classes",
    "loss_terms",
    "make_train_step",
    "to_class_labels",
    "train_and_evaluate",
    "train_step",
    "training_classes",
    "validate_config",
]

AXIS = parallel.DATA_AXIS
MINING_SCOPES = ("local", "global")
NONFINITE_MODES = ("stop", "skip")


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
    if t.on_nonfinite not in NONFINITE_MODES:
        raise ValueError(
            f"config.train.on_nonfinite: {t.on_nonfinite!r}; allowed: {list(NONFINITE_MODES)}"
        )
    for field in ("num_steps", "log_every", "checkpoint_every", "max_nonfinite_skips"):
        if t[field] < 1:
            raise ValueError(f"config.train.{field} must be >= 1, got {t[field]}")
    if t.margin < 0:
        raise ValueError(f"config.train.margin must be >= 0, got {t.margin}")
    validate_margin_softmax(t)
    if d.image_size < 8:
        raise ValueError(f"config.data.image_size must be >= 8, got {d.image_size}")
    if d.channels not in (1, 3):
        raise ValueError(f"config.data.channels must be 1 or 3, got {d.channels}")
    models.create_model(config.model)  # Checks model name, dtype and sizes.


# ----------------------------------------------------------------------------- update step

# The parts of a step the non-finite guard checks, in the bit order of ``metrics["nonfinite"]``.


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    learning_rate_fn: optax.Schedule,
    *,
    loss: LossSettings,
    seed: int,
    axis_name: str = AXIS,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on this device's rows of the global PK batch (runs inside shard_map).

    Args:
      state: replicated train state (with ``class_weights`` W [C, d] for a margin-softmax term).
      batch: ``image`` [B_local, H, W, C] float32, ``label`` [B_local] int32 (-1 = ignore): class
        indices 0..C-1 of the training identities (``to_class_labels``) when there is a
        margin-softmax term; the triplet loss only compares labels, so any labels do for it.
      learning_rate_fn: the run's schedule (only logged here; the optimiser holds the same one).
      loss: the terms and their weights, mining strategy, margins, distances and scope.
      seed: with ``state.step`` (and the device, for local mining), seeds random mining.

    Returns:
      The new state and replicated scalar metrics (loss = the weighted objective, fraction of
      active triplets, mean positive/negative distance, gradient and parameter norms, learning
      rate; with a margin-softmax term also ``triplet_loss``, ``margin_loss``, ``margin_accuracy``
      (training accuracy of W's classifier) and ``margin_mean_target_cos``; and ``nonfinite``:
      0, or the bits ``2**i`` of the ``NONFINITE_PARTS[i]`` that were not finite, in which case
      the returned state is ``state`` with only its step advanced).
    """
    images, labels = batch["image"], batch["label"]
    b_local = labels.shape[0]
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    is_global = loss.scope == "global"
    if not is_global:
        key = jax.random.fold_in(key, lax.axis_index(axis_name))
    mining = dict(
        strategy=loss.mining, margin=loss.margin, squared=loss.squared, soft=loss.soft, key=key
    )

    has_w = state.class_weights is not None
    if bool(loss.margin_kind) != has_w:
        raise ValueError(
            f"loss {loss.margin_kind or 'triplet'!r} and the state's class weights "
            f"({'present' if has_w else 'absent'}) do not match: build the state with "
            "create_train_state(config, ..., num_classes=C) of the same config"
        )

    def loss_fn(trainable):
        params, class_weights = split_trainable(trainable, has_w)
        emb, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.fold_in(key, lax.axis_index(axis_name) + 1)},
        )
        # Without a triplet term the triplets are still mined for their diagnostics, off the tape.
        t_emb = emb if loss.triplet_weight else lax.stop_gradient(emb)
        if is_global:
            all_emb = lax.all_gather(t_emb, axis_name, tiled=True)
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
            terms = losses.triplet_terms(t_emb, labels, **mining)
            count = terms.count
        triplet_value = terms.loss_sum / jnp.maximum(count, 1)
        objective = loss.triplet_weight * triplet_value if loss.triplet_weight else 0.0
        margin_terms = margin_value = None
        if loss.margin_kind:
            # Each row's term needs only that row and W: this device's rows, the count pooled.
            margin_terms = losses.margin_softmax_terms(
                emb,
                labels,
                class_weights,
                kind=loss.margin_kind,
                scale=loss.margin_scale,
                margin=loss.margin_m,
                easy_margin=loss.easy_margin,
            )
            m_count = lax.stop_gradient(margin_terms.count)
            if is_global:
                m_count = lax.psum(m_count, axis_name)
            margin_value = margin_terms.loss_sum / jnp.maximum(m_count, 1)
            objective = objective + loss.margin_weight * margin_value
        aux = (terms, margin_terms, triplet_value, margin_value, updates["batch_stats"])
        return objective, aux

    (loss_value, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    terms, margin_terms, triplet_value, margin_value, batch_stats = aux
    # Global: L = sum_d L_d. Local: L = mean_d L_d. Diagnostics always pool all devices' terms.
    reduce = lax.psum if is_global else lax.pmean
    grads, loss_value = reduce(grads, axis_name), reduce(loss_value, axis_name)
    _, diagnostics = losses.terms_to_loss(jax.tree.map(lambda x: lax.psum(x, axis_name), terms))
    if loss.margin_kind:
        pooled = jax.tree.map(lambda x: lax.psum(x, axis_name), margin_terms)
        _, margin_diagnostics = losses.margin_terms_to_loss(pooled)
        diagnostics = {
            **diagnostics,
            "triplet_loss": reduce(triplet_value, axis_name),
            "margin_loss": reduce(margin_value, axis_name),
            "margin_accuracy": margin_diagnostics["accuracy"],
            "margin_mean_target_cos": margin_diagnostics["mean_target_cos"],
        }
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)

    # Non-finite guard: every input of the flag is replicated (reduced over the axis), so every
    # device and process takes the same decision. A bad update is dropped, the step advances.
    finite = [
        jnp.isfinite(loss_value),
        checkpoints.all_finite(grads),
        checkpoints.all_finite(new_state.trainable),
        checkpoints.all_finite(new_state.batch_stats),
        checkpoints.all_finite(new_state.opt_state),
    ]
    ok = jnp.all(jnp.stack(finite))
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    new_state = new_state.replace(step=state.step + 1)
    metrics = {
        **{k: jnp.asarray(v, jnp.float32) for k, v in diagnostics.items()},
        "loss": loss_value,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(state.params),
        "learning_rate": learning_rate_fn(state.step),
        "nonfinite": sum(jnp.where(f, 0, 2**i) for i, f in enumerate(finite)),
    }
    return new_state, metrics


def make_train_step(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    learning_rate_fn: optax.Schedule | None = None,
):
    """``train_step`` under shard_map (state replicated, batch split) under jit, state donated.

    Returns ``step_fn(state, batch) -> (state, metrics)`` with the schedule, loss settings and
    seed bound (``learning_rate_fn`` defaults to ``create_learning_rate_fn(config)``).
    """
    parallel.check_batch_size(
        config.data.identities_per_batch * config.data.images_per_identity,
        mesh,
        "config.data.identities_per_batch * config.data.images_per_identity",
    )
    step = jax.shard_map(
        functools.partial(
            train_step,
            learning_rate_fn=learning_rate_fn or create_learning_rate_fn(config),
            loss=LossSettings.from_config(config.train),
            seed=int(config.seed),
            axis_name=AXIS,
        ),
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
    """Trains ``config`` in ``workdir`` (resuming from its newest intact checkpoint), evaluates.

    Writes metrics.jsonl, tensorboard/, checkpoints/, config.json, eval.json (trained and
    untrained-baseline verification metrics) and roc.png / distances.png / embeddings.png, holding
    the workdir lock throughout. Returns the final evaluation metrics.

    Raises:
      workdir.WorkdirLockedError: another live process holds the workdir.
      checkpoints.IncompatibleCheckpointError: the workdir's checkpoints are of another config.
      NonFiniteError: the training diverged (nothing is evaluated or reported).
      Preempted: SIGTERM / SIGINT; a checkpoint of the last finished step was saved.
    """
    validate_config(config)
    if config.data.source == "folder":  # Split and P x K from the folder listing, before preparing.
        folder.check_feasible(DataSpec.from_config(config.data), config.eval.split)
    os.makedirs(workdir, exist_ok=True)
    with _workdir_lock(workdir):
        return _train_and_evaluate(config, workdir)


@contextlib.contextmanager
def _workdir_lock(workdir: str):
    """Process 0 holds the lock; every process learns whether it got it."""
    handle = workdir_lib.WorkdirLock(workdir, purpose="train")
    error = None
    if jax.process_index() == 0:
        try:
            handle.acquire()
        except workdir_lib.WorkdirLockedError as e:
            error = e
    if not _on_all_processes(error is None):
        raise error or workdir_lib.WorkdirLockedError(
            f"{workdir!r} is in use by another run (process 0 could not lock it)"
        )
    try:
        yield handle
    finally:
        handle.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    checkpoints.check_compatible(config, workdir)
    is_chief = jax.process_index() == 0

    # --- mesh and input
    mesh = parallel.create_mesh()
    dataset = input_pipeline.create_dataset(config)
    dataset.check_feasible(config.eval.split)  # Before compiling and the baseline evaluation.
    global_batch = config.data.identities_per_batch * config.data.images_per_identity
    learning_rate_fn = create_learning_rate_fn(config)
    step_fn = make_train_step(config, mesh, learning_rate_fn)  # Checks the batch split (cheap).
    classes = dataset_classes(dataset)  # Class c of the margin-softmax terms: identity classes[c].
    logging.info(
        "global batch %d = P %d x K %d on %d devices (%d per device), loss %s %s over %d "
        "training identities, mining %s (%s)",
        global_batch,
        config.data.identities_per_batch,
        config.data.images_per_identity,
        mesh.devices.size,
        global_batch // mesh.devices.size,
        config.train.loss,
        loss_terms(config.train),
        len(classes),
        config.train.mining,
        config.train.mining_scope,
    )

    # --- model and state
    model = models.create_model(config.model, bn_axis_name=AXIS)
    rng = jax.random.key(config.seed)
    state = create_train_state(
        config,
        rng,
        dataset.image_shape,
        model=model,
        learning_rate_fn=learning_rate_fn,
        num_classes=len(classes),
    )
    state = parallel.replicate(state, mesh)
    with contextlib.ExitStack() as cleanup:
        manager = checkpoints.create_manager(workdir, config, for_training=True)
        cleanup.callback(manager.close)

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

        state = checkpoints.restore_latest(manager, state, workdir, config=config, set_aside=True)
        start_step = int(jax.device_get(state.step))
        checkpoints.write_config(config, workdir)
        if start_step:
            logging.info("resumed from checkpoint at step %d", start_step)

        # --- update step
        # Records past the restored step were logged by a run that died before saving them.
        writer = metric_logging.MetricWriter(workdir, resume_step=start_step)
        cleanup.callback(writer.close)
        batches = dataset.train_batches(start_step, jax.process_index(), jax.process_count())
        if hasattr(batches, "close"):  # Stops grain worker processes now, not at exit.
            cleanup.callback(batches.close)
        state = _train_loop(
            state, step_fn, batches, classes, start_step, config, mesh, dataset, manager, writer
        )
        if hasattr(batches, "close"):
            batches.close()

        # --- final evaluation
        trained = evaluate(state, dataset, config, mesh)
        final = report.run_record(trained) | {"step": int(jax.device_get(state.step))}
        if not writer.has(final["step"], "eval/"):  # A finished run evaluated again: once.
            writer.write(final["step"], {f"eval/{k}": v for k, v in final.items() if k != "step"})
        writer.close()
        if is_chief:
            report.write_run(workdir, trained, final, baseline)
    _log_summary(final, baseline, config)
    return final


def _train_loop(
    state: TrainState,
    step_fn,
    batches,
    classes: np.ndarray,
    start_step: int,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    dataset: input_pipeline.FaceDataset,
    manager,
    writer: metric_logging.MetricWriter,
) -> TrainState:
    """Steps ``start_step + 1 .. num_steps``: logs, evaluates, saves; guards and watches signals.

    Batch labels are mapped to class indices into ``classes`` (``to_class_labels``) on the host.
    """
    t = config.train
    global_batch = config.data.identities_per_batch * config.data.images_per_identity
    guard = NonFiniteGuard(t, lambda: last_checkpoint(manager))
    progress = None
    if t.progress_bar and jax.process_index() == 0 and start_step < t.num_steps:
        from tqdm.auto import tqdm

        progress = tqdm(total=t.num_steps, initial=start_step, desc="train", unit="step")
    last_time, last_step = time.perf_counter(), start_step
    collapse_warned = False
    pending = None  # (step, metrics) whose non-finite flag was not read yet.
    try:
        with parallel.PreemptionWatcher() as preemption:
            for step in range(start_step + 1, t.num_steps + 1):
                batch = next(batches)
                batch = parallel.shard_batch(
                    {**batch, "label": to_class_labels(batch["label"], classes)}, mesh
                )
                state, metrics = step_fn(state, batch)
                if pending is not None:  # The previous step, while this one runs.
                    guard.check(*pending)
                pending = (step, metrics)
                if progress is not None:
                    progress.update(1)
                preempted = preemption.reached(step)  # Every step, on every process.
                is_last = step == t.num_steps
                log_now = step % t.log_every == 0 or is_last
                save_now = step % t.checkpoint_every == 0 or is_last or preempted
                eval_now = bool(t.eval_every) and step % t.eval_every == 0 and not is_last
                if not (log_now or save_now or eval_now):
                    continue
                guard.check(step, metrics)  # Before anything is logged, evaluated or saved.
                pending = None
                if log_now:
                    m = parallel.fetch(metrics)
                    del m["nonfinite"]
                    if t.on_nonfinite == "skip":
                        m["skipped_updates"] = guard.take_skipped()
                    now = time.perf_counter()
                    m["images_per_sec"] = (step - last_step) * global_batch / (now - last_time)
                    m["steps_per_sec"] = (step - last_step) / (now - last_time)
                    last_time, last_step = now, step
                    writer.write(step, m)
                    message = guard.last_ok and not collapse_warned and collapse_message(m, t)
                    if message:
                        logging.warning("step %d: %s", step, message)
                        collapse_warned = True
                    if progress is not None:
                        progress.set_postfix(
                            loss=f"{m['loss']:.4f}",
                            active=f"{m['fraction_active']:.2f}",
                            refresh=False,
                        )
                    else:
                        logging.info(
                            "step %d: %s", step, {k: round(float(v), 5) for k, v in m.items()}
                        )
                if eval_now:  # Before the checkpoint: a resumed run re-evaluates what it redoes.
                    m = report.run_record(evaluate(state, dataset, config, mesh))
                    writer.write(step, {f"eval/{k}": v for k, v in m.items()})
                if save_now:
                    checkpoints.save(manager, state)
                if preempted:
                    writer.flush()
                    raise Preempted(
                        f"stopped by {preemption.signal_name}: saved checkpoint step {step} in "
                        f"{checkpoints.checkpoint_dir(writer.workdir)}; run the same command "
                        "again to resume",
                        step,
                        preemption.signal_number,
                    )
    finally:
        if progress is not None:
            progress.close()
    return state


def _log_summary(final: dict[str, Any], baseline: dict[str, Any] | None, config) -> None:
    text = report.summary(final, baseline, config.eval.split)
    logging.info("%s", text)
    if jax.process_index() == 0:
        print(text, flush=True)
