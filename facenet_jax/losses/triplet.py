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
of ``CHUNK`` slots (a while loop over ``ceil(max identity size / CHUNK)`` chunks, one for PK
batches with K <= 8), and each chunk costs fused [A, CHUNK, B] reductions (``losses/tiles.py``
holds this machinery). Selections are made
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
from facenet_jax.losses.tiles import (
    CHUNK,
    Block,
    best_columns,
    fold,
    make_block,
    mix32,
    nearest_negative,
    num_pairs,
    over_positive_slots,
    reduce_columns,
    row_distances,
)

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


def _loss_sum(blk: Block, coef: jax.Array, exact: jax.Array) -> jax.Array:
    """``exact`` in value, with the gradient of ``sum(coef * d)``.

    ``coef[a, j]`` counts the active terms with j as positive minus those with j as negative, so
    ``sum(coef * d) + m * #active`` is the hinge sum and has its exact gradient; the value itself
    comes from the hinges summed directly, which avoids cancellation.
    """
    linear = jnp.sum(coef.astype(blk.dist.dtype) * blk.dist)
    return exact + (linear - lax.stop_gradient(linear))


def _pair_terms(blk: Block, choose: Callable, margin: float) -> TripletTerms:
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
    coef, exact, pos_sum, neg_sum, num_active = over_positive_slots(blk, body, init)
    count = num_pairs(blk)
    return TripletTerms(
        loss_sum=_loss_sum(blk, coef, exact),
        count=count,
        pos_dist_sum=pos_sum,
        neg_dist_sum=neg_sum,
        num_valid=count,
        num_active=num_active.astype(dtype),
    )


# ------------------------------------------------------------------------------ strategies


def _batch_all_terms(blk: Block, margin: float, soft: bool, key) -> TripletTerms:
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
        per_slot = reduce_columns(active.astype(jnp.int32), jnp.sum)  # [A, C]
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
    coef, exact, pos_sum, num_active = over_positive_slots(blk, body, init)
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


def _batch_hard_terms(blk: Block, margin: float, soft: bool, key) -> TripletTerms:
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
    _, pos_col = over_positive_slots(blk, body, init)
    _, neg_col = nearest_negative(blk)
    # Only 2 distances per anchor carry gradient: recompute them from the embeddings (O(A D))
    # instead of back-propagating through the [A, B] matrix (an O(A B D) matmul).
    d_ap = row_distances(blk, jnp.minimum(pos_col, b - 1))
    d_an = row_distances(blk, neg_col)
    gap = d_ap - d_an
    per_anchor = jnp.where(
        blk.valid, jax.nn.softplus(gap) if soft else jax.nn.relu(gap + margin), 0
    )
    count = fold(blk, blk.valid)
    return TripletTerms(
        loss_sum=jnp.sum(per_anchor),
        count=count,
        pos_dist_sum=jnp.sum(jnp.where(blk.valid, lax.stop_gradient(d_ap), 0.0)),
        neg_dist_sum=jnp.sum(jnp.where(blk.valid, lax.stop_gradient(d_an), 0.0)),
        num_valid=count,
        num_active=fold(blk, blk.valid & (lax.stop_gradient(per_anchor) > 0)),
    )


def _semi_hard_terms(blk: Block, margin: float, soft: bool, key) -> TripletTerms:
    del soft, key
    b = blk.fixed.shape[1]
    # Fallback when no negative is farther than the positive: the farthest negative.
    far_dist, far_col = best_columns(blk.tiles, blk.tiles.neg, largest=True)

    def choose(s, ok, col, pos_dist):
        tiles = blk.tiles
        beyond = tiles.neg & (tiles.dist > pos_dist[:, :, None, None])  # [A, C, B/T, T], fused
        # d == nearest > d(a,p) already implies "beyond", so the column search needs only neg.
        nearest, nearest_col = best_columns(tiles, beyond, largest=False, match=tiles.neg)
        found = nearest_col < b
        return jnp.where(found, nearest_col, far_col), jnp.where(found, nearest, far_dist)

    return _pair_terms(blk, choose, margin)


def _hardest_terms(blk: Block, margin: float, soft: bool, key) -> TripletTerms:
    del soft, key
    neg_dist, neg_col = nearest_negative(blk)

    def choose(s, ok, col, pos_dist):
        return (
            jnp.broadcast_to(neg_col[:, None], col.shape),
            jnp.broadcast_to(neg_dist[:, None], col.shape),
        )

    return _pair_terms(blk, choose, margin)


def _random_terms(blk: Block, margin: float, soft: bool, key) -> TripletTerms:
    del soft
    num_neg = blk.num_kept - blk.size  # [A]; negatives are perm[:start] and perm[start+size:kept].
    # One jax.random draw per global row, then a hash of (row bits, slot) per positive slot: the
    # choice depends only on (key, row, slot), whatever the anchor blocks, and stays cheap.
    row_bits = jax.vmap(lambda r: jax.random.bits(jax.random.fold_in(key, r), (), jnp.uint32))(
        blk.rows
    )
    high = jnp.maximum(num_neg, 1).astype(jnp.uint32)[:, None]

    def choose(s, ok, col, pos_dist):
        slot = (s * CHUNK + jnp.arange(CHUNK, dtype=jnp.int32)).astype(jnp.uint32)
        draw = mix32(row_bits[:, None] ^ mix32(slot * jnp.uint32(0x9E3779B9) + 1)[None, :])
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
    blk = make_block(embeddings, labels, squared, anchor_start, num_anchors)
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
