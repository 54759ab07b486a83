"""Anchor blocks and tiled column reductions: the machinery under every triplet strategy.

A *block* is ``A`` anchor rows mined against all ``B`` rows of the (possibly all-gathered) batch.
``make_block`` computes the [A, B] distances once and sorts rows by label so that each identity is
a contiguous run of ``Block.perm``; ``over_positive_slots`` then visits every anchor's positives in
chunks of ``CHUNK`` slots, and ``best_columns`` finds, per (anchor, slot), the extreme distance
over a masked set of columns and its first column, without ever holding [A, CHUNK, B] values.

Package-internal: the strategies of ``facenet_jax.losses.triplet`` are its only callers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from facenet_jax.data.sampling import IGNORE_LABEL
from facenet_jax.distances import pairwise_distances

CHUNK = 8  # Positive slots per anchor processed together; a PK batch with K <= 8 needs one pass.


class Tiles(NamedTuple):
    """Columns viewed as [B/T, T] tiles (see ``reduce_columns``); padding columns are neither."""

    dist: jax.Array  # [A, 1, B/T, T] gradient-free distances, +inf on padding columns.
    neg: jax.Array  # [A, 1, B/T, T] bool negative mask.
    col: jax.Array  # [1, 1, B/T, T] int32 column index.


class Block(NamedTuple):
    """Everything a strategy needs about the anchors ``rows`` mined against all B rows."""

    dist: jax.Array  # [A, B] distances (differentiable).
    fixed: jax.Array  # [A, B] the same distances under stop_gradient, for selections.
    tiles: Tiles
    anchors: jax.Array  # [A, D] anchor embeddings (padding rows zeroed).
    embeddings: jax.Array  # [B, D] all embeddings (padding rows zeroed).
    squared: bool
    rows: jax.Array  # [A] int32 global row index of each anchor.
    valid: jax.Array  # [A] bool: the anchor has a positive and a negative.
    perm: jax.Array  # [B] int32 rows sorted by (ignored, label, row): identities are contiguous.
    start: jax.Array  # [A] int32 position in `perm` of the anchor's identity.
    size: jax.Array  # [A] int32 rows with the anchor's label, anchor included (0 if ignored).
    num_kept: jax.Array  # [] int32 non-ignored rows; they come first in `perm`.


# The in-loop kernels compare every positive slot of an anchor with all B columns: [A, C, B]
# values that must never exist in memory. XLA:CPU fuses an elementwise producer into a reduction
# only when the reduced axis is short or not the minor one, and hands float reductions to a
# library that wants its input materialised. So columns are viewed as [B/T, T] tiles, reductions
# over columns run in two integer steps (over T, then over B/T, kept apart by an optimisation
# barrier so XLA does not merge them back), and extrema of non-negative floats are taken on their
# bit patterns, which order the same way. Peak memory stays O(A * B).
_TILE = 32
_ORDERED_INT = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}


def _ordered_bits(x: jax.Array) -> jax.Array:
    """Bit pattern of non-negative floats as signed ints: same order, integer reductions."""
    return lax.bitcast_convert_type(x, _ORDERED_INT[x.dtype.itemsize])


def reduce_columns(x: jax.Array, op: Callable) -> jax.Array:
    """[A, C, B/T, T] integers -> [A, C] with ``op`` (jnp.sum, jnp.min, jnp.max) over columns."""
    inner = lax.optimization_barrier(op(x, axis=3).astype(x.dtype))
    return op(inner, axis=2).astype(x.dtype)


def best_columns(
    tiles: Tiles, mask: jax.Array, largest: bool, match: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per (anchor, slot), the smallest (largest) distance among ``mask`` and its first column.

    Args:
      tiles: the block's tiles.
      mask: [A, C, B/T, T] bool candidates.
      largest: maximum instead of minimum.
      match: candidates for the column search, if cheaper than ``mask`` and equivalent on the
        columns at the extreme distance.

    Returns:
      ``(value, col)``, both [A, C]; where ``mask`` is empty, ``col`` is B and ``value`` is
      +inf (minimum) or NaN (maximum).
    """
    bits = _ordered_bits(tiles.dist)
    fill = -1 if largest else _ordered_bits(jnp.array(jnp.inf, tiles.dist.dtype))
    best = reduce_columns(jnp.where(mask, bits, fill), jnp.max if largest else jnp.min)
    value = lax.bitcast_convert_type(best, tiles.dist.dtype)
    match = mask if match is None else match
    hit = match & (tiles.dist == value[:, :, None, None])
    num_cols = tiles.col.shape[2] * tiles.col.shape[3]
    col = reduce_columns(jnp.where(hit, tiles.col, num_cols), jnp.min)
    return value, col


def make_block(
    embeddings: jax.Array,
    labels: jax.Array,
    squared: bool,
    anchor_start: jax.Array | int,
    num_anchors: int | None,
) -> Block:
    """The block of anchors ``[anchor_start, anchor_start + num_anchors)`` against all B rows.

    Args: as ``facenet_jax.losses.triplet_terms`` (``num_anchors`` None: all rows). Raises
    ValueError on bad shapes, dtypes or an anchor range outside the batch.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [B, D], got shape {embeddings.shape}")
    b = embeddings.shape[0]
    labels = jnp.asarray(labels)
    if labels.shape != (b,):
        raise ValueError(f"labels must be [B] = [{b}], got shape {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(jnp.int32)
    num_anchors = b if num_anchors is None else int(num_anchors)
    if not 0 < num_anchors <= b:
        raise ValueError(f"num_anchors must be in [1, {b}], got {num_anchors}")
    if isinstance(anchor_start, int) and not 0 <= anchor_start <= b - num_anchors:
        raise ValueError(
            f"anchor rows [{anchor_start}, {anchor_start + num_anchors}) are not inside [0, {b})"
        )
    kept = labels != IGNORE_LABEL
    # Mine in at least float32 (the ||x||^2 - 2 x.y + ||y||^2 cancellation and the counts need
    # it); padding rows may hold anything (even inf): zeroing them keeps every distance finite.
    dtype = jnp.promote_types(embeddings.dtype, jnp.float32)
    embeddings = jnp.where(kept[:, None], embeddings.astype(dtype), 0.0)
    if num_anchors == b:  # all rows (anchor_start must then be 0): the cheaper symmetric form
        rows = jnp.arange(b, dtype=jnp.int32)
        anchor_labels = labels
        anchors = embeddings
        dist = pairwise_distances(embeddings, squared=squared)
    else:
        anchor_start = jnp.asarray(anchor_start, jnp.int32)
        rows = anchor_start + jnp.arange(num_anchors, dtype=jnp.int32)
        anchor_labels = lax.dynamic_slice_in_dim(labels, anchor_start, num_anchors)
        anchors = lax.dynamic_slice_in_dim(embeddings, anchor_start, num_anchors)
        dist = pairwise_distances(anchors, embeddings, squared, row_offset=anchor_start)
    fixed = lax.stop_gradient(dist)
    anchor_kept = anchor_labels != IGNORE_LABEL

    # Identities as contiguous runs of `perm`; kept rows first, so ignored rows sort as +max.
    iota = jnp.arange(b, dtype=jnp.int32)
    _, sorted_labels, perm = lax.sort(((~kept).astype(jnp.int32), labels, iota), num_keys=3)
    num_kept = jnp.sum(kept, dtype=jnp.int32)
    keys = jnp.where(iota < num_kept, sorted_labels, jnp.iinfo(jnp.int32).max)
    start = jnp.searchsorted(keys, anchor_labels, side="left").astype(jnp.int32)
    end = jnp.minimum(jnp.searchsorted(keys, anchor_labels, side="right"), num_kept)
    size = jnp.where(anchor_kept, end - start, 0).astype(jnp.int32)
    valid = anchor_kept & (size >= 2) & (num_kept - size >= 1)

    t = min(_TILE, b)
    tiles_shape = (num_anchors, 1, -(-b // t), t)
    pad = tiles_shape[2] * t - b
    padded_labels = jnp.pad(labels, (0, pad), constant_values=IGNORE_LABEL)
    neg = (
        anchor_kept[:, None]
        & (padded_labels != IGNORE_LABEL)[None, :]
        & (padded_labels[None, :] != anchor_labels[:, None])
    )
    tiles = Tiles(
        dist=jnp.pad(fixed, ((0, 0), (0, pad)), constant_values=jnp.inf).reshape(tiles_shape),
        neg=neg.reshape(tiles_shape),
        col=jnp.arange(b + pad, dtype=jnp.int32).reshape((1, 1) + tiles_shape[2:]),
    )
    return Block(
        dist, fixed, tiles, anchors, embeddings, squared, rows, valid, perm, start, size, num_kept
    )


def fold(blk: Block, x: jax.Array) -> jax.Array:
    """Sum in the distance dtype."""
    return jnp.sum(x.astype(blk.dist.dtype))


def over_positive_slots(blk: Block, body: Callable, init):
    """Runs ``body(s, ok, col, pos_dist, carry)`` over chunks s of every anchor's positives.

    Slot q of anchor a is row ``perm[start[a] + q]`` of its identity (q < size[a]); chunk s holds
    slots ``[s * CHUNK, (s + 1) * CHUNK)``. ``ok`` [A, C] marks slots that are real positives of a
    valid anchor, ``col`` [A, C] their column and ``pos_dist`` [A, C] their gradient-free distance.
    The loop is a while loop over the largest identity in the block, so it is never
    differentiated: bodies only select and count.
    """
    b = blk.fixed.shape[1]
    largest = jnp.max(jnp.where(blk.valid, blk.size, 0))
    offsets = jnp.arange(CHUNK, dtype=jnp.int32)

    def step(s, carry):
        q = s * CHUNK + offsets
        col = blk.perm[jnp.minimum(blk.start[:, None] + q[None, :], b - 1)]
        ok = blk.valid[:, None] & (q[None, :] < blk.size[:, None]) & (col != blk.rows[:, None])
        pos_dist = jnp.take_along_axis(blk.fixed, col, axis=1)
        return body(s, ok, col, pos_dist, carry)

    refs = (blk.fixed, blk.valid, blk.size, blk.start, blk.perm, blk.rows)
    init = varying_like(init, *refs)
    return lax.fori_loop(0, (largest + CHUNK - 1) // CHUNK, step, init)


def varying_like(tree, *refs):
    """Marks constant loop inits as varying over the manual mesh axes that ``refs`` vary over.

    Inside ``shard_map`` (global mining) the loop carry becomes device-varying once the body mixes
    in device-varying data (the anchor block); a ``while`` loop needs its init typed the same.
    Outside ``shard_map`` this is the identity.
    """
    axes = set()
    for ref in refs:
        aval = jax.typeof(ref)
        manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; older: aval.vma
        axes |= set(getattr(manual, "varying", None) or getattr(aval, "vma", None) or ())
    if not axes:
        return tree
    names = tuple(sorted(axes))
    return jax.tree.map(lambda x: lax.pcast(x, names, to="varying"), tree)


def num_pairs(blk: Block) -> jax.Array:
    """Valid (anchor, positive) pairs of the block, in the distance dtype."""
    return jnp.sum(jnp.where(blk.valid, blk.size - 1, 0).astype(blk.dist.dtype))


def nearest_negative(blk: Block) -> tuple[jax.Array, jax.Array]:
    """[A] distance and column of each anchor's closest negative (lowest column among ties)."""
    value, col = best_columns(blk.tiles, blk.tiles.neg, largest=False)
    return value[:, 0], jnp.minimum(col[:, 0], blk.fixed.shape[1] - 1)


def row_distances(blk: Block, cols: jax.Array) -> jax.Array:
    """[A] differentiable d(anchor_i, embeddings[cols_i]) from the difference vectors."""
    sq = jnp.sum(jnp.square(blk.anchors - blk.embeddings[cols]), axis=1)
    if blk.squared:
        return sq
    positive = sq > 0.0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def mix32(x: jax.Array) -> jax.Array:
    """lowbias32 integer hash (C. Wellons): a bijection of uint32 with good avalanche."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)
