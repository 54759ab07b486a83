"""Margin-softmax losses over the training identities: softmax, NormFace, CosFace, ArcFace.

Each embedding ``x_i`` [d] (L2-normalised) is classified among the ``C`` training identities by a
class-weight matrix ``W`` [C, d], and the loss is the cross entropy of the logits ``z_i`` [C]:

    L_i = logsumexp_c(z_ic) - z_{i,y_i},      loss = mean of L_i over rows with y_i != IGNORE_LABEL.

With ``cos_ic = <x_i, w_c> / ||w_c||`` (the cosine between the embedding and the class direction;
``theta_ic = arccos(cos_ic)``), the kinds differ in the logits (``s`` = scale, ``m`` = margin):

* ``softmax`` (FaceNet-era pre-training, Schroff et al. 2015 / davidsandberg's facenet): a plain
  linear classifier, ``z_ic = <x_i, w_c>`` with raw (unnormalised) ``W``; ``s`` and ``m`` unused.
* ``normface`` (Wang et al. 2017): ``z_ic = s cos_ic``.
* ``cosface`` (Wang et al. 2018, also "AM-Softmax"): ``z_ic = s (cos_ic - m [c = y_i])``.
* ``arcface`` (Deng et al. 2019): ``z_ic = s cos(theta_ic + m [c = y_i])``, computed as
  ``cos_ic cos m - sin_ic sin m`` with ``sin_ic = sqrt(1 - cos_ic^2)``. ``cos(theta + m)`` is
  decreasing in theta only while ``theta + m <= pi``; beyond that (``cos_ic <= cos(pi - m)``) the
  target logit would *increase* as the embedding moves away from its class, so, as insightface and
  every common port do, it is replaced there by the CosFace-like ``cos_ic - m sin m`` (so the
  target logit decreases over all of [0, pi], with a downward step of ``cos m + m sin m - 1``, about
  ``m^2 / 2``, at the threshold). ``easy_margin=True`` instead applies the margin only where
  ``cos_ic > 0`` (theta < 90 degrees) and keeps ``cos_ic`` elsewhere.

Like the triplet loss, the loss is written as additive terms over a block of rows so a device can
take its own rows of an all-gathered global batch: ``loss = psum(loss_sum) / psum(count)`` equals
the one-device loss (``docs/losses.md``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from facenet_jax.data.sampling import IGNORE_LABEL

MARGIN_KINDS = ("softmax", "normface", "cosface", "arcface")
_USES_MARGIN = ("cosface", "arcface")


class MarginTerms(NamedTuple):
    """Additive summary of the margin-softmax loss over a block of rows (scalars, summable).

    ``loss = loss_sum / max(count, 1)``; ``count`` is the number of non-ignored rows,
    ``num_correct`` those whose largest *unmodified* logit is their own class (training accuracy),
    ``target_cos_sum`` the sum of their ``cos(theta_{i, y_i})`` (for ``softmax``, the cosine with
    the raw weight's direction).
    """

    loss_sum: jax.Array
    count: jax.Array
    num_correct: jax.Array
    target_cos_sum: jax.Array


def margin_terms_to_loss(terms: MarginTerms) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and diagnostics ``{accuracy, mean_target_cos}`` from (psum-ed) terms."""
    denom = jnp.maximum(terms.count, 1.0)
    diagnostics = {
        "accuracy": terms.num_correct / denom,
        "mean_target_cos": terms.target_cos_sum / denom,
    }
    return terms.loss_sum / denom, diagnostics


def normalize_class_weights(class_weights: jax.Array, eps: float = 1e-12) -> jax.Array:
    """[C, d] -> [C, d]: each row ``w_c / max(||w_c||_2, eps)``, in at least float32.

    Finite gradient even for a zero row. The dtype is kept when wider than float32 (tests).
    """
    w = class_weights.astype(jnp.promote_types(class_weights.dtype, jnp.float32))
    sq = jnp.sum(w * w, axis=-1, keepdims=True)
    return w * lax.rsqrt(jnp.maximum(sq, eps * eps))


def init_class_weights(
    key: jax.Array, num_classes: int, embedding_dim: int, dtype=jnp.float32
) -> jax.Array:
    """[C, d] initial class weights, N(0, 0.01^2) as insightface's ``partial_fc``.

    Margin kinds only use the directions; for ``softmax`` the small norm means small initial logits.
    """
    if num_classes < 1 or embedding_dim < 1:
        raise ValueError(
            f"num_classes and embedding_dim must be positive, got {num_classes}, {embedding_dim}"
        )
    return 0.01 * jax.random.normal(key, (num_classes, embedding_dim), dtype)


def _safe_sin(cos: jax.Array) -> jax.Array:
    """sqrt(1 - cos^2), 0 (with a zero gradient) where rounding puts |cos| >= 1."""
    s2 = 1.0 - cos * cos
    positive = s2 > 0.0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, s2, 1.0)), 0.0)


def _target_logit(cos: jax.Array, kind: str, margin: float, easy_margin: bool) -> jax.Array:
    """The target cosine with its margin (before the scale): [A] -> [A]."""
    if kind == "cosface":
        return cos - margin
    if kind == "arcface":
        with_margin = cos * math.cos(margin) - _safe_sin(cos) * math.sin(margin)
        if easy_margin:
            return jnp.where(cos > 0.0, with_margin, cos)
        threshold = math.cos(math.pi - margin)  # theta + m = pi
        return jnp.where(cos > threshold, with_margin, cos - margin * math.sin(margin))
    return cos


def margin_softmax_terms(
    embeddings: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    kind: str = "arcface",
    scale: float = 64.0,
    margin: float = 0.0,
    easy_margin: bool = False,
    anchor_start: jax.Array | int = 0,
    num_anchors: int | None = None,
) -> MarginTerms:
    """Additive loss terms of the rows ``[anchor_start, anchor_start + num_anchors)``.

    With ``embeddings``/``labels`` the all-gathered global batch, ``anchor_start =
    lax.axis_index('data') * B_local`` and ``num_anchors = B_local``, the psum of the terms over
    devices is exactly the terms of the whole batch (each row's loss depends only on that row and
    ``class_weights``).

    Args:
      embeddings: [B, d] float, L2-normalised (not checked); computed in at least float32.
      labels: [B] int class indices in ``[0, C)``, or ``IGNORE_LABEL`` (-1) for rows that take no
        part (padding, or identities without a class). Other values are a caller bug and are not
        detected under jit.
      class_weights: [C, d] float, one row per training identity (normalised here for the margin
        kinds; used raw by ``softmax``).
      kind: one of ``MARGIN_KINDS``.
      scale: ``s``, the logit scale of the normalised kinds (typical: 30-64); unused by softmax.
      margin: ``m``: CosFace's cosine margin (typical 0.35) or ArcFace's angle margin in radians
        (typical 0.5); must be 0 for softmax and normface.
      easy_margin: arcface only: apply the angular margin only where ``cos > 0`` (see module doc).
      anchor_start: first row of the block (may be traced).
      num_anchors: rows in the block (static); None for all B rows (then ``anchor_start`` is 0).

    Returns:
      ``MarginTerms`` of scalars; ``margin_terms_to_loss`` turns them into the loss.
    """
    if kind not in MARGIN_KINDS:
        raise ValueError(f"unknown margin-softmax kind {kind!r}; valid: {list(MARGIN_KINDS)}")
    if margin != 0 and kind not in _USES_MARGIN:
        raise ValueError(f"margin={margin} is not used by kind {kind!r}; only by {_USES_MARGIN}")
    if kind == "arcface" and not 0 <= margin < math.pi / 2:
        raise ValueError(f"arcface margin is an angle in radians in [0, pi/2), got {margin}")
    if easy_margin and kind != "arcface":
        raise ValueError(f"easy_margin is only defined for kind 'arcface', not {kind!r}")
    if kind != "softmax" and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if embeddings.ndim != 2 or class_weights.ndim != 2:
        raise ValueError(
            f"embeddings must be [B, d] and class_weights [C, d], got shapes {embeddings.shape} "
            f"and {class_weights.shape}"
        )
    b, d = embeddings.shape
    if class_weights.shape[1] != d:
        raise ValueError(f"class_weights {class_weights.shape} do not match embeddings [B, {d}]")
    labels = jnp.asarray(labels)
    if labels.shape != (b,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be [B] = [{b}] integers, got {labels.shape} {labels.dtype}")
    num_anchors = b if num_anchors is None else int(num_anchors)
    if not 0 < num_anchors <= b:
        raise ValueError(f"num_anchors must be in [1, {b}], got {num_anchors}")
    if isinstance(anchor_start, int) and not 0 <= anchor_start <= b - num_anchors:
        raise ValueError(
            f"anchor rows [{anchor_start}, {anchor_start + num_anchors}) are not inside [0, {b})"
        )

    dtype = jnp.promote_types(jnp.promote_types(embeddings.dtype, class_weights.dtype), jnp.float32)
    x = lax.dynamic_slice_in_dim(embeddings.astype(dtype), anchor_start, num_anchors)  # [A, d]
    y = lax.dynamic_slice_in_dim(labels.astype(jnp.int32), anchor_start, num_anchors)  # [A]
    kept = y != IGNORE_LABEL
    y_safe = jnp.where(kept, y, 0)
    w = class_weights.astype(dtype)
    w_unit = normalize_class_weights(w)
    if kind == "softmax":
        logits = x @ w.T  # [A, C]
        target_cos = jnp.sum(x * w_unit[y_safe], axis=1)
    else:
        cos = x @ w_unit.T  # [A, C]
        target_cos = jnp.take_along_axis(cos, y_safe[:, None], axis=1)[:, 0]
        logits = scale * cos
    target = jnp.take_along_axis(logits, y_safe[:, None], axis=1)[:, 0]  # [A]
    if kind in _USES_MARGIN:
        new_target = scale * _target_logit(target_cos, kind, margin, easy_margin)
        one_hot = jax.nn.one_hot(y_safe, logits.shape[1], dtype=dtype)
        margined = logits + one_hot * (new_target - target)[:, None]
    else:
        new_target, margined = target, logits
    per_row = jax.nn.logsumexp(margined, axis=1) - new_target  # [A]
    correct = jnp.argmax(lax.stop_gradient(logits), axis=1) == y_safe
    return MarginTerms(
        loss_sum=jnp.sum(jnp.where(kept, per_row, 0.0)),
        count=jnp.sum(kept.astype(dtype)),
        num_correct=jnp.sum((kept & correct).astype(dtype)),
        target_cos_sum=jnp.sum(jnp.where(kept, lax.stop_gradient(target_cos), 0.0)),
    )


def margin_softmax_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    kind: str = "arcface",
    scale: float = 64.0,
    margin: float = 0.0,
    easy_margin: bool = False,
) -> jax.Array:
    """Mean margin-softmax cross entropy over the non-ignored rows (0 if there are none).

    Args: as ``margin_softmax_terms`` (all rows). embeddings [B, d], labels [B], class_weights
    [C, d].

    Returns:
      [] float32 (float64 for float64 inputs) loss.
    """
    terms = margin_softmax_terms(
        embeddings,
        labels,
        class_weights,
        kind=kind,
        scale=scale,
        margin=margin,
        easy_margin=easy_margin,
    )
    return margin_terms_to_loss(terms)[0]
