"""Triplet losses with online mining: exact, jit-compiled, O(B^2) memory.

Notation: ``d(a, x)`` is the squared Euclidean distance (``squared=False``: Euclidean), ``m`` the
margin. For an anchor ``a`` (a row whose label is not ``IGNORE_LABEL``), its *positives* are the
other rows with its label and its *negatives* the rows with another label (never ``IGNORE_LABEL``).
A valid pair ``(a, p)`` is a positive pair whose anchor has at least one negative; a valid triplet
is ``(a, p, n)`` with ``(a, p)`` valid and ``n`` a negative of ``a``. Strategies
(``docs/mining.md`` has the full story):

* ``batch_all``: mean of ``relu(d(a,p) - d(a,n) + m)`` over the valid triplets where it is
  ``> 1e-16`` (the active ones); 0 if none.
* ``batch_hard``: per anchor with a positive and a negative,
  ``relu(max_p d(a,p) - min_n d(a,n) + m)`` (``soft``: ``softplus(max_p d - min_n d)``, no margin);
  mean over those anchors.
* ``semi_hard``: per valid pair, ``n`` = the negative with the smallest ``d(a,n) > d(a,p)``, or, if
  there is none, the negative with the largest ``d(a,n)``; mean of ``relu(d(a,p) - d(a,n) + m)``
  over valid pairs.
* ``hardest``: per valid pair, ``n`` = the negative with the smallest ``d(a,n)``; same mean.
* ``random``: per valid pair, ``n`` uniform among the anchor's negatives; same mean.

Ties between distances are broken by the lowest column index.

Every strategy is a *terms* function over a block of anchor rows ``[anchor_start, anchor_start +
num_anchors)`` mined against all ``B`` rows (O(num_anchors * B) memory); terms are sums, so the
terms of disjoint blocks add up to the terms of the whole batch. That is how a device mines only its
own anchors against an all-gathered global batch: ``terms_to_loss(psum(terms))`` is exactly the
single-device loss. No [B, B, B] tensor is ever built: per anchor, positives are visited in chunks
of ``_CHUNK`` slots (a while loop over ``ceil(max identity size / _CHUNK)`` chunks, one for PK
batches with K <= 8), and each chunk costs fused [A, _CHUNK, B] reductions. Selections are made
without gradients; the loss is then ``sum_j u_j d_j - sum_k w_k d_k + m * #active`` with integer
weights (how often each distance enters an active term), which has exactly the gradient of the
piecewise-linear loss, while its value is the directly summed hinge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from facenet_jax.data.sampling import IGNORE_LABEL
from facenet_jax.distances import pairwise_distances

_CHUNK = 8  # Positive slots per anchor processed together; a PK batch with K <= 8 needs one pass.
_ACTIVE_EPS = 1e-16  # batch_all counts a triplet as active when its hinge is > this.


# ----------------------------------------------------------------------------------- masks


def anchor_positive_mask(labels: jax.Array) -> jax.Array:
    """[B, B] bool: ``M[a, p]`` iff ``a != p``, ``labels[a] == labels[p]`` and neither is ignored.

    Args:
      labels: [B] int labels; ``IGNORE_LABEL`` marks padding rows.
    """
    labels = jnp.asarray(labels)
    same = labels[:, None] == labels[None, :]
    keep = labels != IGNORE_LABEL
    return same & keep[:, None] & ~jnp.eye(labels.shape[0], dtype=bool)


def anchor_negative_mask(labels: jax.Array) -> jax.Array:
    """[B, B] bool: ``M[a, n]`` iff ``labels[a] != labels[n]`` and neither is ignored."""
    labels = jnp.asarray(labels)
    keep = labels != IGNORE_LABEL
    return (labels[:, None] != labels[None, :]) & keep[:, None] & keep[None, :]


def triplet_mask(labels: jax.Array) -> jax.Array:
    """[B, B, B] bool: ``M[a, p, n]`` iff ``(a, p)`` is a positive pair and ``n`` a negative of a.

    B^3 memory: for tests and small batches only; no loss uses it.
    """
    return anchor_positive_mask(labels)[:, :, None] & anchor_negative_mask(labels)[:, None, :]


# ----------------------------------------------------------------------------------- terms


class TripletTerms(NamedTuple):
    """Additive summary of a loss over a block of anchors (every field a scalar, summable).

    ``loss = loss_sum / max(count, 1)``. ``count`` is what the loss averages over (active triplets
    for batch_all, valid anchors for batch_hard, valid pairs otherwise); ``pos_dist_sum`` and
    ``neg_dist_sum`` sum d(a,p) and d(a,n) over those same terms. ``num_valid`` counts the
    candidates (valid triplets, anchors or pairs) and ``num_active`` those with a positive loss.
    """

    loss_sum: jax.Array
    count: jax.Array
    pos_dist_sum: jax.Array
    neg_dist_sum: jax.Array
    num_valid: jax.Array
    num_active: jax.Array


def terms_to_loss(terms: TripletTerms) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and diagnostics from (possibly psum-ed) terms.

    Returns:
      ``(loss, {num_valid, num_active, fraction_active, mean_pos_dist, mean_neg_dist})``.
    """
    denom = jnp.maximum(terms.count, 1.0)
    diagnostics = {
        "num_valid": terms.num_valid,
        "num_active": terms.num_active,
        "fraction_active": terms.num_active / jnp.maximum(terms.num_valid, 1.0),
        "mean_pos_dist": terms.pos_dist_sum / denom,
        "mean_neg_dist": terms.neg_dist_sum / denom,
    }
    return terms.loss_sum / denom, diagnostics


class _Tiles(NamedTuple):
    """Columns viewed as [B/T, T] tiles (see ``_reduce_columns``); padding columns are neither."""

    dist: jax.Array  # [A, 1, B/T, T] gradient-free distances, +inf on padding columns.
    neg: jax.Array  # [A, 1, B/T, T] bool negative mask.
    col: jax.Array  # [1, 1, B/T, T] int32 column index.


class _Block(NamedTuple):
    """Everything a strategy needs about the anchors ``rows`` mined against all B rows."""

    dist: jax.Array  # [A, B] distances (differentiable).
    fixed: jax.Array  # [A, B] the same distances under stop_gradient, for selections.
    tiles: _Tiles
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


def _reduce_columns(x: jax.Array, op: Callable) -> jax.Array:
    """[A, C, B/T, T] integers -> [A, C] with ``op`` (jnp.sum, jnp.min, jnp.max) over columns."""
    inner = lax.optimization_barrier(op(x, axis=3).astype(x.dtype))
    return op(inner, axis=2).astype(x.dtype)


def _best_columns(
    tiles: _Tiles, mask: jax.Array, largest: bool, match: jax.Array | None = None
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
    best = _reduce_columns(jnp.where(mask, bits, fill), jnp.max if largest else jnp.min)
    value = lax.bitcast_convert_type(best, tiles.dist.dtype)
    match = mask if match is None else match
    hit = match & (tiles.dist == value[:, :, None, None])
    num_cols = tiles.col.shape[2] * tiles.col.shape[3]
    col = _reduce_columns(jnp.where(hit, tiles.col, num_cols), jnp.min)
    return value, col


def _make_block(
    embeddings: jax.Array,
    labels: jax.Array,
    squared: bool,
    anchor_start: jax.Array | int,
    num_anchors: int | None,
) -> _Block:
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
    tiles = _Tiles(
        dist=jnp.pad(fixed, ((0, 0), (0, pad)), constant_values=jnp.inf).reshape(tiles_shape),
        neg=neg.reshape(tiles_shape),
        col=jnp.arange(b + pad, dtype=jnp.int32).reshape((1, 1) + tiles_shape[2:]),
    )
    return _Block(
        dist, fixed, tiles, anchors, embeddings, squared, rows, valid, perm, start, size, num_kept
    )


def _fold(blk: _Block, x: jax.Array) -> jax.Array:
    """Sum in the distance dtype."""
    return jnp.sum(x.astype(blk.dist.dtype))


def _over_positive_slots(blk: _Block, body: Callable, init):
    """Runs ``body(s, ok, col, pos_dist, carry)`` over chunks s of every anchor's positives.

    Slot q of anchor a is row ``perm[start[a] + q]`` of its identity (q < size[a]); chunk s holds
    slots ``[s * _CHUNK, (s + 1) * _CHUNK)``. ``ok`` [A, C] marks slots that are real positives of a
    valid anchor, ``col`` [A, C] their column and ``pos_dist`` [A, C] their gradient-free distance.
    The loop is a while loop over the largest identity in the block, so it is never
    differentiated: bodies only select and count.
    """
    b = blk.fixed.shape[1]
    largest = jnp.max(jnp.where(blk.valid, blk.size, 0))
    offsets = jnp.arange(_CHUNK, dtype=jnp.int32)

    def step(s, carry):
        q = s * _CHUNK + offsets
        col = blk.perm[jnp.minimum(blk.start[:, None] + q[None, :], b - 1)]
        ok = blk.valid[:, None] & (q[None, :] < blk.size[:, None]) & (col != blk.rows[:, None])
        pos_dist = jnp.take_along_axis(blk.fixed, col, axis=1)
        return body(s, ok, col, pos_dist, carry)

    refs = (blk.fixed, blk.valid, blk.size, blk.start, blk.perm, blk.rows)
    init = _varying_like(init, *refs)
    return lax.fori_loop(0, (largest + _CHUNK - 1) // _CHUNK, step, init)


def _varying_like(tree, *refs):
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


def _loss_sum(blk: _Block, coef: jax.Array, exact: jax.Array) -> jax.Array:
    """``exact`` in value, with the gradient of ``sum(coef * d)``.

    ``coef[a, j]`` counts the active terms with j as positive minus those with j as negative, so
    ``sum(coef * d) + m * #active`` is the hinge sum and has its exact gradient; the value itself
    comes from the hinges summed directly, which avoids cancellation.
    """
    linear = jnp.sum(coef.astype(blk.dist.dtype) * blk.dist)
    return exact + (linear - lax.stop_gradient(linear))


def _num_pairs(blk: _Block) -> jax.Array:
    return jnp.sum(jnp.where(blk.valid, blk.size - 1, 0).astype(blk.dist.dtype))


def _pair_terms(blk: _Block, choose: Callable, margin: float) -> TripletTerms:
    """Terms of a strategy that picks one negative per valid pair.

    ``choose(s, ok, col, pos_dist) -> (neg_col, neg_dist)``, both [A, C], without gradients.
    """
    a, b = blk.fixed.shape
    dtype = blk.dist.dtype
    row_ix = jnp.arange(a, dtype=jnp.int32)[:, None]

    def body(s, ok, col, pos_dist, carry):
        coef, exact, pos_sum, neg_sum, num_active = carry
        neg_col, neg_dist = choose(s, ok, col, pos_dist)
        hinge = pos_dist - neg_dist + margin
        active = (ok & (hinge > 0)).astype(jnp.int32)
        cols = jnp.concatenate([jnp.where(ok, col, b), jnp.where(ok, neg_col, b)], axis=1)
        coef = coef.at[row_ix, cols].add(jnp.concatenate([active, -active], 1), mode="drop")
        return (
            coef,
            exact + jnp.sum(jnp.where(active > 0, hinge, 0.0)),
            pos_sum + jnp.sum(jnp.where(ok, pos_dist, 0.0)),
            neg_sum + jnp.sum(jnp.where(ok, neg_dist, 0.0)),
            num_active + jnp.sum(active, dtype=jnp.int32),
        )

    zero = jnp.zeros((), dtype)
    init = (jnp.zeros((a, b), jnp.int32), zero, zero, zero, jnp.int32(0))
    coef, exact, pos_sum, neg_sum, num_active = _over_positive_slots(blk, body, init)
    count = _num_pairs(blk)
    return TripletTerms(
        loss_sum=_loss_sum(blk, coef, exact),
        count=count,
        pos_dist_sum=pos_sum,
        neg_dist_sum=neg_sum,
        num_valid=count,
        num_active=num_active.astype(dtype),
    )


# ------------------------------------------------------------------------------ strategies


def _batch_all_terms(blk: _Block, margin: float, soft: bool, key) -> TripletTerms:
    del soft, key
    a, b = blk.fixed.shape
    dtype = blk.dist.dtype
    row_ix = jnp.arange(a, dtype=jnp.int32)[:, None]

    def active_hinge(tiles, ok, pos_dist):
        hinge = pos_dist[:, :, None, None] - tiles.dist + margin  # [A, C, B/T, T], fused
        return ok[:, :, None, None] & tiles.neg & (hinge > _ACTIVE_EPS), hinge

    def body(s, ok, col, pos_dist, carry):
        coef, exact, pos_sum, num_active = carry
        active, _ = active_hinge(blk.tiles, ok, pos_dist)
        per_slot = _reduce_columns(active.astype(jnp.int32), jnp.sum)  # [A, C]
        # A separate copy of the inputs, so the [A, C, B] producer is not shared (and stored).
        active, hinge = active_hinge(*lax.optimization_barrier((blk.tiles, ok, pos_dist)))
        per_neg, value = lax.reduce(
            (active.astype(jnp.int32), jnp.where(active, hinge, 0.0)),
            (jnp.int32(0), jnp.zeros((), dtype)),
            lambda x, y: (x[0] + y[0], x[1] + y[1]),
            (1,),
        )
        coef = coef.at[row_ix, jnp.where(ok, col, b)].add(per_slot, mode="drop")
        coef = coef - per_neg.reshape(a, -1)[:, :b]
        return (
            coef,
            exact + jnp.sum(value),
            pos_sum + jnp.sum(per_slot * pos_dist),
            num_active + jnp.sum(per_slot, dtype=jnp.int32),
        )

    zero = jnp.zeros((), dtype)
    init = (jnp.zeros((a, b), jnp.int32), zero, zero, jnp.int32(0))
    coef, exact, pos_sum, num_active = _over_positive_slots(blk, body, init)
    num_active = num_active.astype(dtype)
    num_neg = (blk.num_kept - blk.size).astype(dtype)
    return TripletTerms(
        loss_sum=_loss_sum(blk, coef, exact),
        count=num_active,
        pos_dist_sum=pos_sum,
        # sum over active of d(a,n) = sum of (d(a,p) + m) - sum of hinges (a diagnostic only).
        neg_dist_sum=pos_sum + margin * num_active - exact,
        num_valid=jnp.sum(jnp.where(blk.valid, (blk.size - 1).astype(dtype) * num_neg, 0.0)),
        num_active=num_active,
    )


def _nearest_negative(blk: _Block) -> tuple[jax.Array, jax.Array]:
    """[A] distance and column of each anchor's closest negative (lowest column among ties)."""
    value, col = _best_columns(blk.tiles, blk.tiles.neg, largest=False)
    return value[:, 0], jnp.minimum(col[:, 0], blk.fixed.shape[1] - 1)


def _row_distances(blk: _Block, cols: jax.Array) -> jax.Array:
    """[A] differentiable d(anchor_i, embeddings[cols_i]) from the difference vectors."""
    sq = jnp.sum(jnp.square(blk.anchors - blk.embeddings[cols]), axis=1)
    if blk.squared:
        return sq
    positive = sq > 0.0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _batch_hard_terms(blk: _Block, margin: float, soft: bool, key) -> TripletTerms:
    del key
    b = blk.fixed.shape[1]

    def body(s, ok, col, pos_dist, carry):  # running farthest positive, lowest column on ties
        best, best_col = carry
        far = jnp.max(jnp.where(ok, pos_dist, -jnp.inf), axis=1)
        far_col = jnp.min(jnp.where(ok & (pos_dist == far[:, None]), col, b), axis=1)
        better = (far > best) | ((far == best) & (far_col < best_col))
        return jnp.where(better, far, best), jnp.where(better, far_col, best_col)

    a = blk.fixed.shape[0]
    init = (jnp.full((a,), -jnp.inf, blk.fixed.dtype), jnp.full((a,), b, jnp.int32))
    _, pos_col = _over_positive_slots(blk, body, init)
    _, neg_col = _nearest_negative(blk)
    # Only 2 distances per anchor carry gradient: recompute them from the embeddings (O(A D))
    # instead of back-propagating through the [A, B] matrix (an O(A B D) matmul).
    d_ap = _row_distances(blk, jnp.minimum(pos_col, b - 1))
    d_an = _row_distances(blk, neg_col)
    gap = d_ap - d_an
    per_anchor = jnp.where(
        blk.valid, jax.nn.softplus(gap) if soft else jax.nn.relu(gap + margin), 0
    )
    count = _fold(blk, blk.valid)
    return TripletTerms(
        loss_sum=jnp.sum(per_anchor),
        count=count,
        pos_dist_sum=jnp.sum(jnp.where(blk.valid, lax.stop_gradient(d_ap), 0.0)),
        neg_dist_sum=jnp.sum(jnp.where(blk.valid, lax.stop_gradient(d_an), 0.0)),
        num_valid=count,
        num_active=_fold(blk, blk.valid & (lax.stop_gradient(per_anchor) > 0)),
    )


def _semi_hard_terms(blk: _Block, margin: float, soft: bool, key) -> TripletTerms:
    del soft, key
    b = blk.fixed.shape[1]
    # Fallback when no negative is farther than the positive: the farthest negative.
    far_dist, far_col = _best_columns(blk.tiles, blk.tiles.neg, largest=True)

    def choose(s, ok, col, pos_dist):
        tiles = blk.tiles
        beyond = tiles.neg & (tiles.dist > pos_dist[:, :, None, None])  # [A, C, B/T, T], fused
        # d == nearest > d(a,p) already implies "beyond", so the column search needs only neg.
        nearest, nearest_col = _best_columns(tiles, beyond, largest=False, match=tiles.neg)
        found = nearest_col < b
        return jnp.where(found, nearest_col, far_col), jnp.where(found, nearest, far_dist)

    return _pair_terms(blk, choose, margin)


def _hardest_terms(blk: _Block, margin: float, soft: bool, key) -> TripletTerms:
    del soft, key
    neg_dist, neg_col = _nearest_negative(blk)

    def choose(s, ok, col, pos_dist):
        return (
            jnp.broadcast_to(neg_col[:, None], col.shape),
            jnp.broadcast_to(neg_dist[:, None], col.shape),
        )

    return _pair_terms(blk, choose, margin)


def _mix32(x: jax.Array) -> jax.Array:
    """lowbias32 integer hash (C. Wellons): a bijection of uint32 with good avalanche."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _random_terms(blk: _Block, margin: float, soft: bool, key) -> TripletTerms:
    del soft
    num_neg = blk.num_kept - blk.size  # [A]; negatives are perm[:start] and perm[start+size:kept].
    # One jax.random draw per global row, then a hash of (row bits, slot) per positive slot: the
    # choice depends only on (key, row, slot), whatever the anchor blocks, and stays cheap.
    row_bits = jax.vmap(lambda r: jax.random.bits(jax.random.fold_in(key, r), (), jnp.uint32))(
        blk.rows
    )
    high = jnp.maximum(num_neg, 1).astype(jnp.uint32)[:, None]

    def choose(s, ok, col, pos_dist):
        slot = (s * _CHUNK + jnp.arange(_CHUNK, dtype=jnp.int32)).astype(jnp.uint32)
        draw = _mix32(row_bits[:, None] ^ _mix32(slot * jnp.uint32(0x9E3779B9) + 1)[None, :])
        rank = (draw % high).astype(jnp.int32)  # modulo bias < num_neg / 2^32
        where = jnp.where(rank < blk.start[:, None], rank, rank + blk.size[:, None])
        neg_col = blk.perm[jnp.clip(where, 0, blk.fixed.shape[1] - 1)]
        return neg_col, jnp.take_along_axis(blk.fixed, neg_col, axis=1)

    return _pair_terms(blk, choose, margin)


STRATEGIES: dict[str, Callable[..., TripletTerms]] = {
    "batch_all": _batch_all_terms,
    "batch_hard": _batch_hard_terms,
    "semi_hard": _semi_hard_terms,
    "hardest": _hardest_terms,
    "random": _random_terms,
}


# ------------------------------------------------------------------------------ public API


def triplet_terms(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    strategy: str = "semi_hard",
    margin: float = 0.2,
    squared: bool = True,
    soft: bool = False,
    key: jax.Array | None = None,
    anchor_start: jax.Array | int = 0,
    num_anchors: int | None = None,
) -> TripletTerms:
    """Additive loss terms of the anchors ``[anchor_start, anchor_start + num_anchors)``.

    The anchors are mined against all B rows, so with ``embeddings`` the all-gathered global batch
    and ``anchor_start = lax.axis_index('data') * B_local``, summing the terms over devices gives
    exactly the terms of the whole batch (``random`` draws per global row from ``key``).

    Args:
      embeddings: [B, D] float embeddings (L2-normalised in FaceNet, not required here); mined in
        float32 (or float64) even when given in a lower precision.
      labels: [B] int labels; ``IGNORE_LABEL`` (-1) rows are neither anchors, positives nor
        negatives.
      strategy: a key of ``STRATEGIES``.
      margin: alpha, the margin of the hinge (unused by ``soft`` batch_hard).
      squared: squared Euclidean distances (FaceNet) or Euclidean ones.
      soft: ``batch_hard`` only: softplus(max_p d - min_n d) instead of the hinge.
      key: PRNG key, required by ``random``.
      anchor_start: first anchor row (may be traced); the block must lie inside the batch, and
        must be 0 when ``num_anchors`` is B.
      num_anchors: number of anchor rows (static); None for all B rows.

    Returns:
      ``TripletTerms`` of scalars; ``terms_to_loss`` turns them into the loss.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown triplet strategy {strategy!r}; valid: {sorted(STRATEGIES)}")
    if soft and strategy != "batch_hard":
        raise ValueError(f"soft=True is only defined for strategy 'batch_hard', not {strategy!r}")
    if strategy == "random" and key is None:
        raise ValueError("strategy 'random' needs a PRNG key: pass key=jax.random.key(...)")
    blk = _make_block(embeddings, labels, squared, anchor_start, num_anchors)
    return STRATEGIES[strategy](blk, margin, soft, key)


def triplet_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    strategy: str = "semi_hard",
    margin: float = 0.2,
    squared: bool = True,
    soft: bool = False,
    key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Triplet loss of the whole batch with the named mining strategy.

    Args: as ``triplet_terms`` (all rows are anchors).

    Returns:
      ``(loss, diagnostics)``: scalar loss and the dict of ``terms_to_loss``.
    """
    terms = triplet_terms(
        embeddings, labels, strategy=strategy, margin=margin, squared=squared, soft=soft, key=key
    )
    return terms_to_loss(terms)


def batch_all_triplet_loss(
    embeddings: jax.Array, labels: jax.Array, margin: float = 0.2, squared: bool = True
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean hinge over the active (> 1e-16) valid triplets. embeddings: [B, D], labels: [B]."""
    return triplet_loss(embeddings, labels, strategy="batch_all", margin=margin, squared=squared)


def batch_hard_triplet_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    margin: float = 0.2,
    squared: bool = True,
    soft: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over valid anchors of relu(max_p d - min_n d + m); soft: softplus(max_p d - min_n d)."""
    return triplet_loss(
        embeddings, labels, strategy="batch_hard", margin=margin, squared=squared, soft=soft
    )


def semi_hard_triplet_loss(
    embeddings: jax.Array, labels: jax.Array, margin: float = 0.2, squared: bool = True
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """FaceNet semi-hard loss: mean over valid pairs with the nearest negative beyond d(a,p)."""
    return triplet_loss(embeddings, labels, strategy="semi_hard", margin=margin, squared=squared)
