"""Training faults on the host side: the non-finite guard, preemption, collapse advice
(docs/reliability.md)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from absl import logging

# What the step's on-device flag covers: bit i of the flag is NONFINITE_PARTS[i].
NONFINITE_PARTS = ("loss", "gradients", "parameters", "batch_stats", "optimizer state")


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
        self.last_ok = True  # Whether the last step checked was finite.

    def check(self, step: int, metrics: dict[str, jax.Array]) -> None:
        code = int(jax.device_get(metrics["nonfinite"]))
        self.last_ok = not code
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


def last_checkpoint(manager) -> str:
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
