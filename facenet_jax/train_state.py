"""The train state (parameters, BatchNorm statistics, class weights, optimiser state), the
learning-rate schedule and the optimiser, each built once from the config."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from facenet_jax import (
    losses,
    models,
    parallel,
)
from facenet_jax.objective import LossSettings

AXIS = parallel.DATA_AXIS


class TrainState(train_state.TrainState):
    """step, params, opt_state (from flax) plus BatchNorm running statistics and class weights.

    ``class_weights`` is the margin-softmax class-weight matrix W [C, d] (None for triplet-only
    runs). The optimiser updates ``trainable``: the model ``params`` alone when there is no W (so
    a triplet-only state, its optimiser state included, has the layout it always had), else
    ``{"model": params, "class_weights": W}`` (one optimiser, one gradient clipping norm over
    both). A new array field is saved and restored with the rest once
    ``checkpoints.state_to_dict`` lists it.
    """

    batch_stats: Any = None
    class_weights: Any = None

    @property
    def trainable(self) -> Any:
        """What the optimiser updates (and what the step differentiates)."""
        return _trainable(self.params, self.class_weights)

    def apply_gradients(self, *, grads: Any, **kwargs) -> TrainState:
        """One optimiser update of ``trainable``; ``grads`` has its structure."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.trainable)
        params, class_weights = split_trainable(
            optax.apply_updates(self.trainable, updates), self.class_weights is not None
        )
        return self.replace(
            step=self.step + 1,
            params=params,
            class_weights=class_weights,
            opt_state=opt_state,
            **kwargs,
        )

    @classmethod
    def create(cls, *, apply_fn, params, tx, class_weights=None, **kwargs) -> TrainState:
        return cls(
            step=0,
            apply_fn=apply_fn,
            params=params,
            tx=tx,
            opt_state=tx.init(_trainable(params, class_weights)),
            class_weights=class_weights,
            **kwargs,
        )


def _trainable(params: Any, class_weights: Any) -> Any:
    return params if class_weights is None else {"model": params, "class_weights": class_weights}


def split_trainable(trainable: Any, has_class_weights: bool) -> tuple[Any, Any]:
    """Inverse of ``_trainable``: (params, class_weights or None)."""
    if not has_class_weights:
        return trainable, None
    return trainable["model"], trainable["class_weights"]


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
    num_classes: int | None = None,
) -> TrainState:
    """Initialises params and BatchNorm statistics for images [1, H, W, C], and the class weights.

    ``model`` (default: built from ``config.model`` with synchronised BatchNorm on the data axis)
    and ``learning_rate_fn`` (default: ``create_learning_rate_fn(config)``) are passed in by a run
    that builds them once. Init runs outside shard_map in inference mode, where BatchNorm uses no
    axis, so the same module serves init and the step. The model is initialised from ``rng``
    itself, whatever the loss, so ``inference.untrained_embedder`` rebuilds step 0 from the seed.

    ``num_classes`` (C, the training identities: ``len(training_classes(...))``) is needed when
    ``config.train.loss`` has a margin-softmax term: W [C, embedding_dim] is drawn by
    ``losses.init_class_weights`` from ``fold_in(rng, 1)``. Triplet-only runs have no W.
    """
    model = model or models.create_model(config.model, bn_axis_name=AXIS)
    variables = jax.jit(functools.partial(model.init, train=False))(
        rng, jnp.zeros((1, *image_shape), jnp.float32)
    )
    class_weights = None
    if LossSettings.from_config(config.train).margin_kind:
        if num_classes is None:
            raise ValueError(
                f"config.train.loss={config.train.loss!r} trains a class-weight matrix: "
                "create_train_state needs num_classes (the number of training identities)"
            )
        class_weights = losses.init_class_weights(
            jax.random.fold_in(rng, 1), int(num_classes), config.model.embedding_dim
        )
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        class_weights=class_weights,
        tx=create_optimizer(config, learning_rate_fn),
    )
