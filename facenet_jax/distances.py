"""Pairwise distances between embeddings, safe to differentiate everywhere.

``d(x, y) = ||x - y||^2`` (``squared=True``, FaceNet's choice) or ``||x - y||``, computed as
``||x||^2 - 2 x.y + ||y||^2`` with one matmul, so an [A, B] matrix costs O(A B D) time and
O(A B) memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def pairwise_distances(
    a: jax.Array,
    b: jax.Array | None = None,
    squared: bool = True,
    *,
    row_offset: jax.Array | int | None = None,
) -> jax.Array:
    """Distances between the rows of ``a`` and the rows of ``b``.

    ``D[i, j] = ||a_i - b_j||^2`` (or its square root with ``squared=False``), clamped at 0 against
    rounding. Entries that are the distance of a row to itself are exactly 0: the diagonal when
    ``b is None`` (``b = a``), or ``(i, i + row_offset)`` when ``a`` is the block of rows
    ``[row_offset, row_offset + A)`` of ``b`` (``row_offset`` may be traced).

    The square root is taken only of positive entries, ``where(D > 0, sqrt(D), 0)`` with the
    argument of ``sqrt`` replaced by 1 elsewhere, so coinciding embeddings give a zero, finite
    gradient instead of ``0 * inf = nan``.

    Args:
      a: [A, D] float embeddings.
      b: [B, D] float embeddings, or None for ``b = a`` (then ``row_offset`` defaults to 0).
      squared: squared Euclidean distances (True) or Euclidean distances (False).
      row_offset: row of ``b`` that ``a[0]`` is; None for no self-pairs (``b`` given).

    Returns:
      [A, B] distances, dtype of ``a``.
    """
    if b is None:
        if a.ndim != 2:
            raise ValueError(f"embeddings must be [B, D], got shape {a.shape}")
        d = _self_squared(a)
        row_offset = 0 if row_offset is None else row_offset
    else:
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
            raise ValueError(f"embeddings must be [A, D] and [B, D], got {a.shape} and {b.shape}")
        d = _squared(a, b)
    # `where`, not `maximum`: rounding can give -0.0 or tiny negatives, and exact +0.0 keeps the
    # bit patterns of distances ordered like their values (losses.py relies on it).
    d = jnp.where(d > 0.0, d, 0.0)
    if row_offset is not None:
        rows = jnp.arange(d.shape[0]) + row_offset
        d = jnp.where(rows[:, None] == jnp.arange(d.shape[1])[None, :], 0.0, d)
    if squared:
        return d
    positive = d > 0.0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, d, 1.0)), 0.0)


def _matmul(x: jax.Array, y: jax.Array) -> jax.Array:
    # HIGHEST: on GPU/TPU the default f32 matmul may round inputs to tf32/bf16, and the
    # ||x||^2 + ||y||^2 - 2 x.y cancellation would turn that into large distance errors.
    return jnp.matmul(x, y, precision=lax.Precision.HIGHEST)


def _squared(a: jax.Array, b: jax.Array) -> jax.Array:
    """[A, B] ``||a_i||^2 - 2 a_i.b_j + ||b_j||^2`` (not clamped)."""
    sq_a = jnp.sum(jnp.square(a), axis=1)
    sq_b = jnp.sum(jnp.square(b), axis=1)
    return sq_a[:, None] - 2.0 * _matmul(a, b.T) + sq_b[None, :]


@jax.custom_vjp
def _self_squared(x: jax.Array) -> jax.Array:
    """``_squared(x, x)`` whose backward pass costs one matmul instead of two."""
    return _squared(x, x)


def _self_squared_fwd(x):
    return _squared(x, x), x


def _self_squared_bwd(x, g):
    # f_ij = n_i + n_j - 2 x_i.x_j  =>  df/dx = 2 (rowsum(S) x - S x) with S = G + G^T.
    s = g + g.T
    return (2.0 * (jnp.sum(s, axis=1)[:, None] * x - _matmul(s, x)),)


_self_squared.defvjp(_self_squared_fwd, _self_squared_bwd)
