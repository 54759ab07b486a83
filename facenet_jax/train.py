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
import dataclasses
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

from facenet_jax import (
    checkpoints,
    inference,
    losses,
    metric_logging,
    models,
    parallel,
)
from facenet_jax import workdir as workdir_lib
from facenet_jax.data import input_pipeline
from facenet_jax.evaluate import report

AXIS = parallel.DATA_AXIS
MINING_SCOPES = ("local", "global")
NONFINITE_MODES = ("stop", "skip")


class TrainState(train_state.TrainState):
    """step, params, opt_state (from flax) plus BatchNorm running statistics.

    A new array field is saved and restored with the rest once ``checkpoints.state_to_dict``
    lists it.
    """

    batch_stats: Any = None


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The triplet loss the step computes (static, hashable: bound with ``functools.partial``)."""

    mining: str = "semi_hard"  # losses.STRATEGIES.
    margin: float = 0.2
    squared: bool = True
    soft: bool = False
    scope: str = "global"  # MINING_SCOPES.

    @classmethod
    def from_config(cls, train_config: ml_collections.ConfigDict) -> LossSettings:
        t = train_config
        return cls(t.mining, float(t.margin), bool(t.squared), bool(t.soft), t.mining_scope)


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
    if d.image_size < 8:
        raise ValueError(f"config.data.image_size must be >= 8, got {d.image_size}")
    if d.channels not in (1, 3):
        raise ValueError(f"config.data.channels must be 1 or 3, got {d.channels}")
    models.create_model(config.model)  # Checks model name, dtype and sizes.


# ----------------------------------------------------------------------------- optimiser


def create_learning_rate_fn(config: ml_collections.ConfigDict) -> optax.Schedule:
    """step -> learning rate (``config.train.schedule``), built once per run."""
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


def create_optimizer(
    config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule | None = None
) -> optax.GradientTransformation:
    t = config.train
    tx = OPTIMIZERS[t.optimizer](t, learning_rate_fn or create_learning_rate_fn(config))
    if t.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), tx)
    return tx


# ----------------------------------------------------------------------------- state


def create_train_state(
    config: ml_collections.ConfigDict,
    rng: jax.Array,
    image_shape: tuple[int, int, int],
    *,
    model: Any = None,
    learning_rate_fn: optax.Schedule | None = None,
) -> TrainState:
    """Initialises params and BatchNorm statistics for images [1, H, W, C].

    ``model`` (default: built from ``config.model`` with synchronised BatchNorm on the data axis)
    and ``learning_rate_fn`` (default: ``create_learning_rate_fn(config)``) are passed in by a run
    that builds them once. Init runs outside shard_map in inference mode, where BatchNorm uses no
    axis, so the same module serves init and the step.
    """
    model = model or models.create_model(config.model, bn_axis_name=AXIS)
    variables = jax.jit(functools.partial(model.init, train=False))(
        rng, jnp.zeros((1, *image_shape), jnp.float32)
    )
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=create_optimizer(config, learning_rate_fn),
    )


# ----------------------------------------------------------------------------- update step

# The parts of a step the non-finite guard checks, in the bit order of ``metrics["nonfinite"]``.
NONFINITE_PARTS = ("loss", "gradients", "parameters", "batch_stats", "optimizer state")


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
      state: replicated train state.
      batch: ``image`` [B_local, H, W, C] float32, ``label`` [B_local] int32 (-1 = ignore).
      learning_rate_fn: the run's schedule (only logged here; the optimiser holds the same one).
      loss: mining strategy, margin, distances and scope.
      seed: with ``state.step`` (and the device, for local mining), seeds random mining.

    Returns:
      The new state and replicated scalar metrics (loss, fraction of active triplets, mean
      positive/negative distance, gradient and parameter norms, learning rate, and ``nonfinite``:
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

    def loss_fn(params):
        emb, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.fold_in(key, lax.axis_index(axis_name) + 1)},
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
        loss_value = terms.loss_sum / jnp.maximum(count, 1)
        return loss_value, (terms, updates["batch_stats"])

    (loss_value, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    # Global: L = sum_d L_d. Local: L = mean_d L_d. Diagnostics always pool all devices' terms.
    reduce = lax.psum if is_global else lax.pmean
    grads, loss_value = reduce(grads, axis_name), reduce(loss_value, axis_name)
    _, diagnostics = losses.terms_to_loss(jax.tree.map(lambda x: lax.psum(x, axis_name), terms))
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)

    # Non-finite guard: every input of the flag is replicated (reduced over the axis), so every
    # device and process takes the same decision. A bad update is dropped, the step advances.
    finite = [
        jnp.isfinite(loss_value),
        checkpoints.all_finite(grads),
        checkpoints.all_finite(new_state.params),
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


# ----------------------------------------------------------------------------- faults


class NonFiniteError(FloatingPointError):
    """Training produced NaN or inf: ``on_nonfinite=stop``, or too many skipped steps in a row."""


class Preempted(Exception):  # noqa: N818 -- an outcome, like KeyboardInterrupt.
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint at ``step``."""

    def __init__(self, message: str, step: int, signal_number: int):
        super().__init__(message)
        self.step = step
        self.signal_number = signal_number


class NonFiniteGuard:
    """The host side of the guard: reads each step's ``nonfinite`` flag and stops or counts.

    The flag of step s is read after step s+1 is dispatched (and at every step that logs, saves or
    evaluates), so the device never waits for the host; a checkpoint is only written after the
    flags of all steps up to it were read.
    """

    def __init__(self, train_config: ml_collections.ConfigDict, last_good: Any):
        self.mode = train_config.on_nonfinite
        self.max_in_a_row = train_config.max_nonfinite_skips
        self.last_good = last_good  # () -> "checkpoint step 3 in DIR" (what a rerun resumes).
        self.skipped = 0  # Since the last ``take_skipped``.
        self.in_a_row = 0

    def check(self, step: int, metrics: dict[str, jax.Array]) -> None:
        code = int(jax.device_get(metrics["nonfinite"]))
        if not code:
            self.in_a_row = 0
            return
        parts = [name for i, name in enumerate(NONFINITE_PARTS) if code >> i & 1]
        values = {k: float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm")}
        what = (
            f"step {step}: non-finite {', '.join(parts)} "
            f"(loss {values['loss']:.4g}, grad_norm {values['grad_norm']:.4g})"
        )
        advice = (
            "lower config.train.learning_rate or set config.train.grad_clip_norm; "
            "config.train.on_nonfinite=skip drops such steps instead"
        )
        if self.mode == "stop":
            raise NonFiniteError(
                f"{what}: the update was not applied and no checkpoint written; "
                f"last good checkpoint: {self.last_good()}; {advice}"
            )
        self.skipped += 1
        self.in_a_row += 1
        logging.warning("%s: update skipped (%d in a row)", what, self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"{what}: {self.in_a_row} non-finite steps in a row "
                f"(config.train.max_nonfinite_skips={self.max_in_a_row}), stopping; "
                f"last good checkpoint: {self.last_good()}; {advice}"
            )

    def take_skipped(self) -> int:
        n, self.skipped = self.skipped, 0
        return n


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
    global_batch = config.data.identities_per_batch * config.data.images_per_identity
    learning_rate_fn = create_learning_rate_fn(config)
    step_fn = make_train_step(config, mesh, learning_rate_fn)  # Checks the batch split (cheap).
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
    model = models.create_model(config.model, bn_axis_name=AXIS)
    rng = jax.random.key(config.seed)
    state = create_train_state(
        config, rng, dataset.image_shape, model=model, learning_rate_fn=learning_rate_fn
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
            state, step_fn, batches, start_step, config, mesh, dataset, manager, writer
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
    start_step: int,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    dataset: input_pipeline.FaceDataset,
    manager,
    writer: metric_logging.MetricWriter,
) -> TrainState:
    """Steps ``start_step + 1 .. num_steps``: logs, evaluates, saves; guards and watches signals."""
    t = config.train
    global_batch = config.data.identities_per_batch * config.data.images_per_identity
    guard = NonFiniteGuard(t, lambda: _last_checkpoint(manager))
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
                batch = parallel.shard_batch(next(batches), mesh)
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
                    if not collapse_warned and (message := collapse_message(m, t)):
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


def _last_checkpoint(manager) -> str:
    steps = manager.all_steps()
    if not steps:
        return "none (a rerun starts from step 0)"
    return f"step {max(steps)} in {manager.directory}"


COLLAPSE_DISTANCE = 1e-2  # Mean mined distances below this (both) mean f(x) is ~constant.


def collapse_message(
    metrics: dict[str, Any], train_config: ml_collections.ConfigDict | None = None
) -> str | None:
    """A warning when the mined triplets say the embedding has collapsed to one point, else None.

    With unit-norm embeddings, distinct identities at a mean mined distance d(a,n) < 0.01 (and
    positives as close) mean f(x) is nearly constant: the failure of the hardest negatives that
    FaceNet describes (docs/ablations.md measures it for batch_hard and hardest). The advice
    depends on the run's ``train_config``: semi-hard mining is only suggested to runs without it.
    """
    pos, neg = float(metrics["mean_pos_dist"]), float(metrics["mean_neg_dist"])
    if max(pos, neg) >= COLLAPSE_DISTANCE or metrics.get("num_valid", 1) == 0:
        return None
    message = (
        f"the embedding looks collapsed: mean mined d(a,p) = {pos:.2g} and d(a,n) = {neg:.2g} "
        f"(< {COLLAPSE_DISTANCE:g}), {float(metrics['fraction_active']):.0%} active; f(x) is "
        "nearly constant. "
    )
    if train_config is not None and train_config.mining == "semi_hard":
        return message + (
            "Semi-hard mining is already on: a learning rate too high for the network is the "
            f"usual cause; lower config.train.learning_rate (now {train_config.learning_rate:g}) "
            "or set config.train.grad_clip_norm"
        )
    return message + (
        "Semi-hard mining (train.mining=semi_hard) avoids this; with "
        "hardest negatives, plain distances (train.squared=False) helped (docs/ablations.md)"
    )


def _log_summary(final: dict[str, Any], baseline: dict[str, Any] | None, config) -> None:
    text = report.summary(final, baseline, config.eval.split)
    logging.info("%s", text)
    if jax.process_index() == 0:
        print(text, flush=True)
