"""Triplet losses against a brute-force reference that loops over every (a, p, n).

The reference lives only here: it computes distances from explicit differences, selects the
triplets of each strategy with Python loops over all B^3 candidates (ties -> lowest index), and
differentiates the plain sum of the selected hinges. Most comparisons run in float64.
"""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from facenet_jax import losses
from facenet_jax.data.sampling import IGNORE_LABEL
from facenet_jax.losses import (
    STRATEGIES,
    anchor_negative_mask,
    anchor_positive_mask,
    terms_to_loss,
    triplet_loss,
    triplet_mask,
    triplet_terms,
)
from facenet_jax.losses.tiles import CHUNK

DETERMINISTIC = ["batch_all", "batch_hard", "semi_hard", "hardest"]
KEY = jax.random.key(0)

# ------------------------------------------------------------------------------ reference


def _ref_dist(emb, squared):
    sq = np.sum((emb[:, None, :] - emb[None, :, :]) ** 2, axis=-1)
    return sq if squared else np.sqrt(sq)


def _closest(cands, row):
    return min(cands, key=lambda j: (row[j], j))  # ties -> lowest index


def _farthest(cands, row):
    return min(cands, key=lambda j: (-row[j], j))


def _ref_select(d, labels, strategy, margin):
    """Brute force. Returns (triplets (a, p, n) whose hinges are averaged, count, num_valid)."""
    b = len(labels)
    used, count, num_valid = [], 0, 0
    for a in range(b):
        if labels[a] == IGNORE_LABEL:
            continue
        ps = [p for p in range(b) if p != a and labels[p] == labels[a]]
        ns = [n for n in range(b) if labels[n] not in (labels[a], IGNORE_LABEL)]
        if not ps or not ns:
            continue
        row = d[a]
        if strategy == "batch_all":
            for p in ps:
                for n in ns:
                    num_valid += 1
                    if row[p] - row[n] + margin > 1e-16:
                        used.append((a, p, n))
        elif strategy == "batch_hard":
            num_valid += 1
            used.append((a, _farthest(ps, row), _closest(ns, row)))
        else:
            for p in ps:
                num_valid += 1
                if strategy == "hardest":
                    n = _closest(ns, row)
                elif strategy == "semi_hard":
                    beyond = [j for j in ns if row[j] > row[p]]
                    n = _closest(beyond, row) if beyond else _farthest(ns, row)
                else:  # unique negative (the tests only use `random` where there is one)
                    assert len(ns) == 1
                    n = ns[0]
                used.append((a, p, n))
    count = len(used) if strategy == "batch_all" else num_valid
    return used, count, num_valid


def reference(emb, labels, strategy, margin=0.2, squared=True, soft=False):
    """(loss, grad, diagnostics) of the brute-force reference, all in float64 NumPy.

    The gradient is the chain rule written out: each used triplet adds ``g`` to d(a,p) and ``-g``
    to d(a,n) (g = 1 for an active hinge, 0 for an inactive one, sigmoid(gap) for softplus), and
    ``d||e_i - e_j||^2 / de_i = 2 (e_i - e_j)``, ``d||e_i - e_j|| / de_i = (e_i - e_j) / d_ij``.
    """
    emb = np.asarray(emb, np.float64)
    labels = np.asarray(labels)
    d = _ref_dist(emb, squared)
    used, count, num_valid = _ref_select(d, labels, strategy, margin)
    idx = np.array(used, dtype=np.int64).reshape(-1, 3)
    a, p, n = idx.T
    gap = d[a, p] - d[a, n]
    if soft:
        per, slope = np.logaddexp(0.0, gap), 1.0 / (1.0 + np.exp(-gap))
    else:
        per, slope = np.maximum(gap + margin, 0.0), (gap + margin > 0).astype(float)
    denom = max(count, 1)
    coef = np.zeros_like(d)
    np.add.at(coef, (a, p), slope / denom)
    np.add.at(coef, (a, n), -slope / denom)
    if squared:
        k = 2.0 * np.ones_like(d)
    else:
        k = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    m = coef * k
    grad = (m.sum(1) + m.sum(0))[:, None] * emb - m @ emb - m.T @ emb
    diag = {
        "num_valid": num_valid,
        "num_active": int(np.sum(per > 0)),
        "mean_pos_dist": float(np.sum(d[a, p]) / denom),
        "mean_neg_dist": float(np.sum(d[a, n]) / denom),
    }
    return float(np.sum(per) / denom), grad, diag


@functools.partial(jax.jit, static_argnames=("strategy", "squared", "soft"))
def _fast(emb, labels, key, margin, *, strategy, squared, soft):
    def f(e):
        return triplet_loss(
            e, labels, strategy=strategy, margin=margin, squared=squared, soft=soft, key=key
        )

    (loss, diag), grad = jax.value_and_grad(f, has_aux=True)(emb)
    return loss, grad, diag


def fast(emb, labels, strategy, margin=0.2, squared=True, soft=False, key=KEY):
    """Loss, gradient and diagnostics of the library (jitted; margin traced to share compiles)."""
    emb = jnp.asarray(emb)
    labels = jnp.asarray(labels, jnp.int32)
    margin = jnp.asarray(margin, emb.dtype)
    loss, grad, diag = _fast(
        emb, labels, key, margin, strategy=strategy, squared=squared, soft=soft
    )
    return float(loss), np.asarray(grad), {k: float(v) for k, v in diag.items()}


def assert_matches(emb, labels, strategy, rtol=1e-9, grad_atol=1e-9, **kw):
    want_loss, want_grad, want_diag = reference(emb, labels, strategy, **kw)
    got_loss, got_grad, got_diag = fast(emb, labels, strategy, **kw)
    np.testing.assert_allclose(got_loss, want_loss, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(got_grad, want_grad, rtol=rtol * 10, atol=grad_atol)
    for name, want in want_diag.items():
        np.testing.assert_allclose(got_diag[name], want, rtol=rtol, atol=1e-12, err_msg=name)
    assert np.isfinite(got_grad).all()
    return got_loss


# ---------------------------------------------------------------------------------- inputs

LABELS = {
    # 4 identities x 4 images, identity-major like the PK sampler.
    "pk": np.repeat(np.arange(4), 4),
    # Arbitrary int32 values, singletons, an identity larger than one chunk of 8, padding.
    "ragged": np.array([7, -5, 7, 2**30, 3, 3, 7, -1, 7, 7, 7, 7, 7, 7, 7, 3]),
}


def _emb(seed, labels, dim=3):
    return np.random.default_rng(seed).normal(size=(len(labels), dim))


# ------------------------------------------------------------------------------------ tests


def test_masks_match_loops():
    labels = LABELS["ragged"]
    b = len(labels)
    pos, neg, trip = (
        np.asarray(f(jnp.asarray(labels)))
        for f in (anchor_positive_mask, anchor_negative_mask, triplet_mask)
    )
    for a in range(b):
        for j in range(b):
            keep = labels[a] != IGNORE_LABEL and labels[j] != IGNORE_LABEL
            assert pos[a, j] == (keep and a != j and labels[a] == labels[j])
            assert neg[a, j] == (keep and labels[a] != labels[j])
    np.testing.assert_array_equal(trip, pos[:, :, None] & neg[:, None, :])


def test_hand_computed_example():
    # 1-D points 0, 1, 2, 4 with labels 0, 0, 1, 1 (then padding), squared distances, margin 2:
    # d01=1 d02=4 d03=16 d12=1 d13=9 d23=4 (docs/mining.md works through the same example).
    emb = np.zeros((16, 1), np.float32)
    emb[:4, 0] = [0, 1, 2, 4]
    labels = np.concatenate([[0, 0, 1, 1], np.full(12, IGNORE_LABEL)])
    run = lambda s, **kw: fast(emb, labels, s, margin=2.0, **kw)
    loss, _, diag = run("batch_all")  # active: (1,0,2)=2, (2,3,0)=2, (2,3,1)=5
    assert loss == pytest.approx(9 / 3)
    assert (diag["num_valid"], diag["num_active"]) == (8, 3)
    loss, _, diag = run("batch_hard")  # per anchor: 1-4+2, 1-1+2, 4-1+2, 4-9+2
    assert loss == pytest.approx(7 / 4)
    assert (diag["num_valid"], diag["num_active"]) == (4, 2)
    loss, _, _ = run("batch_hard", soft=True)
    softplus = lambda x: np.log1p(np.exp(x))
    assert loss == pytest.approx((softplus(-3) + softplus(0) + softplus(3) + softplus(-5)) / 4)
    # (0,1)->n2 (d=4 > 1), (1,0)->n3 (d=9; d=1 is not > 1), (2,3): nothing beyond 4, so the
    # farthest negative n0 (d=4), hinge 2; (3,2)->n1 (d=9).
    loss, _, diag = run("semi_hard")
    assert loss == pytest.approx(2 / 4)
    assert diag["mean_neg_dist"] == pytest.approx((4 + 9 + 4 + 9) / 4)
    assert diag["num_active"] == 1
    loss, _, _ = run("hardest")  # (1,0)->n2: 1-1+2, (2,3)->n1: 4-1+2
    assert loss == pytest.approx(7 / 4)


@pytest.mark.parametrize("strategy", DETERMINISTIC)
@pytest.mark.parametrize("labels_name", ["pk", "ragged"])
@pytest.mark.parametrize("squared", [True, False])
def test_random_inputs_match_reference_float64(strategy, labels_name, squared):
    labels = LABELS[labels_name]
    with jax.enable_x64(True):
        for seed in range(2):
            emb = _emb(seed, labels) * 0.6
            margin = 0.2 if squared else 0.5
            assert_matches(emb, labels, strategy, margin=margin, squared=squared)


def test_soft_batch_hard_matches_reference():
    with jax.enable_x64(True):
        assert_matches(_emb(3, LABELS["ragged"]), LABELS["ragged"], "batch_hard", soft=True)


@pytest.mark.parametrize("strategy", DETERMINISTIC)
def test_float32_within_tolerance(strategy):
    labels = LABELS["ragged"]
    emb = _emb(5, labels, dim=8)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    want_loss, want_grad, _ = reference(emb, labels, strategy)
    got_loss, got_grad, _ = fast(emb.astype(np.float32), labels, strategy)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-4 * np.abs(want_grad).max())


@pytest.mark.parametrize("strategy", DETERMINISTIC)
@pytest.mark.parametrize("squared", [True, False])
def test_ties_and_duplicates(strategy, squared):
    # Integer points: every distance is exact, so ties are exact on both sides, and with an
    # integer margin many hinges are exactly 0 (inactive, zero gradient).
    labels = LABELS["ragged"]
    with jax.enable_x64(True):
        for seed in range(2):
            emb = np.random.default_rng(seed).integers(-1, 2, size=(len(labels), 2)).astype(float)
            emb[1] = emb[0]  # duplicates across identities
            emb[5] = emb[4]  # and within one
            assert_matches(emb, labels, strategy, margin=1.0, squared=squared)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize(
    "labels",
    [np.zeros(16, int), np.arange(16), np.full(16, IGNORE_LABEL), np.tile([0, 1, -1, 2], 4)],
    ids=["one_identity", "singletons", "all_padding", "mixed"],
)
def test_degenerate_batches_are_finite(strategy, labels):
    emb = _emb(0, labels)
    emb[2] = emb[4]
    loss, grad, diag = fast(emb.astype(np.float32), labels, strategy)
    if len(set(labels.tolist()) - {IGNORE_LABEL}) < 2 or len(set(labels.tolist())) == 16:
        assert loss == 0.0 and diag["num_valid"] == 0
    else:
        assert diag["num_valid"] > 0
    assert np.isfinite(loss) and np.isfinite(grad).all()
    assert all(np.isfinite(v) for v in diag.values())


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_padding_rows_are_ignored(strategy):
    """Padding content is irrelevant and gets no gradient; the rest matches the reference."""
    labels = np.concatenate([np.repeat(np.arange(4), 3), np.full(4, IGNORE_LABEL)])
    emb = _emb(1, labels).astype(np.float32)
    emb[12:] = 0.0
    garbage = emb.copy()
    garbage[12:15] = 1e3
    garbage[15] = np.inf
    loss, grad, diag = fast(emb, labels, strategy)
    g_loss, g_grad, g_diag = fast(garbage, labels, strategy)
    assert g_loss == loss and g_diag == diag
    np.testing.assert_array_equal(g_grad, grad)
    np.testing.assert_array_equal(grad[12:], 0.0)
    if strategy != "random":
        want_loss, want_grad, _ = reference(emb, labels, strategy)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
        np.testing.assert_allclose(grad, want_grad, atol=1e-5)


def test_labels_are_arbitrary_int32():
    labels = LABELS["ragged"]
    relabelled = np.unique(labels, return_inverse=True)[1]
    relabelled = np.where(labels == IGNORE_LABEL, IGNORE_LABEL, relabelled + 100)
    emb = _emb(2, labels).astype(np.float32)
    for strategy in DETERMINISTIC:
        np.testing.assert_allclose(
            fast(emb, labels, strategy)[0], fast(emb, relabelled, strategy)[0], rtol=1e-6
        )


@functools.partial(jax.jit, static_argnames=("strategy", "soft", "block"))
def _blocked(emb, labels, key, margin, *, strategy, soft, block):
    """Loss, gradient and diagnostics from the summed terms of anchor blocks of `block` rows."""

    def loss_fn(e):
        def one(start):  # start is traced, as lax.axis_index('data') * B_local would be
            return triplet_terms(
                e,
                labels,
                strategy=strategy,
                margin=margin,
                soft=soft,
                key=key,
                anchor_start=start,
                num_anchors=block,
            )

        parts = jax.lax.map(one, jnp.arange(0, e.shape[0], block))
        return terms_to_loss(jax.tree.map(lambda x: jnp.sum(x, axis=0), parts))

    (loss, diag), grad = jax.value_and_grad(loss_fn, has_aux=True)(emb)
    return loss, grad, diag


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_anchor_blocks_add_up_to_the_full_batch(strategy):
    """Terms of 4 blocks of 4 rows, summed, give the full-batch loss, gradient and diagnostics."""
    labels = LABELS["ragged"]
    soft = strategy == "batch_hard"
    with jax.enable_x64(True):
        emb = _emb(4, labels)
        f_loss, f_grad, f_diag = fast(emb, labels, strategy, margin=0.3, soft=soft)
        b_loss, b_grad, b_diag = _blocked(
            jnp.asarray(emb),
            jnp.asarray(labels, jnp.int32),
            KEY,
            jnp.float64(0.3),
            strategy=strategy,
            soft=soft,
            block=4,
        )
    assert f_diag["num_valid"] > 0
    np.testing.assert_allclose(b_loss, f_loss, rtol=1e-12)
    np.testing.assert_allclose(b_grad, f_grad, rtol=1e-10, atol=1e-12)
    for name in f_diag:
        np.testing.assert_allclose(b_diag[name], f_diag[name], rtol=1e-12, err_msg=name)


def test_random_with_a_unique_negative_matches_reference():
    # Anchors 0-2 have exactly one negative (row 3); row 3 has no positive; the rest is padding.
    labels = np.concatenate([[0, 0, 0, 1], np.full(12, IGNORE_LABEL)])
    with jax.enable_x64(True):
        assert_matches(_emb(0, labels), labels, "random", margin=2.0)


def test_random_is_uniform_over_negatives():
    """Averaged over keys, the random loss is the mean over valid (a, p) of the mean over n."""
    labels = LABELS["pk"]
    emb = (_emb(6, labels) * 0.5).astype(np.float32)
    d = np.sum((emb[:, None].astype(float) - emb[None]) ** 2, -1)
    per_pair = []
    for a in range(16):
        ns = [n for n in range(16) if labels[n] != labels[a]]
        for p in range(16):
            if p != a and labels[p] == labels[a]:
                per_pair.append(np.mean([max(d[a, p] - d[a, n] + 0.5, 0) for n in ns]))
    samples = np.array(
        [fast(emb, labels, "random", margin=0.5, key=k)[0] for k in jax.random.split(KEY, 200)]
    )
    assert len(np.unique(samples)) > 150  # draws differ between keys
    sem = samples.std() / np.sqrt(len(samples))
    assert abs(samples.mean() - np.mean(per_pair)) < 5 * sem


def test_bad_arguments_raise():
    emb, labels = jnp.ones((4, 2)), jnp.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="valid: .*semi_hard"):
        triplet_loss(emb, labels, strategy="semihard")
    with pytest.raises(ValueError, match="PRNG key"):
        triplet_loss(emb, labels, strategy="random")
    with pytest.raises(ValueError, match="soft=True"):
        triplet_loss(emb, labels, strategy="semi_hard", soft=True)
    with pytest.raises(ValueError, match="labels must be"):
        triplet_loss(emb, labels[:3])
    with pytest.raises(ValueError, match="not inside"):
        triplet_terms(emb, labels, anchor_start=3, num_anchors=2)


def test_public_wrappers_match_reference():
    labels = LABELS["pk"]
    emb = _emb(8, labels).astype(np.float32)

    @jax.jit
    def wrappers(e):
        return (
            losses.batch_all_triplet_loss(e, labels),
            losses.batch_hard_triplet_loss(e, labels, soft=True),
            losses.semi_hard_triplet_loss(e, labels, squared=False),
        )

    got = wrappers(emb)
    cases = [("batch_all", {}), ("batch_hard", {"soft": True}), ("semi_hard", {"squared": False})]
    for (loss, diag), (name, kw) in zip(got, cases, strict=True):
        want = reference(emb, labels, name, **kw)[0]
        np.testing.assert_allclose(float(loss), want, rtol=1e-5, err_msg=name)
        assert set(diag) == {
            "num_valid",
            "num_active",
            "fraction_active",
            "mean_pos_dist",
            "mean_neg_dist",
        }


def _largest_intermediate(jaxpr) -> int:
    """Most elements of any value produced anywhere in a (closed) jaxpr, sub-jaxprs included."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            largest = max(largest, _largest_intermediate(sub))
    return largest


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_no_cubic_intermediate(strategy):
    """Forward and backward never hold B^3 values; the in-loop [B, 8, B] slices are the largest."""
    b = 64
    labels = jnp.asarray(np.repeat(np.arange(b // 8), 8))
    loss = lambda e: triplet_loss(e, labels, strategy=strategy, key=KEY)[0]
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(jnp.ones((b, 16)))
    assert _largest_intermediate(jaxpr.jaxpr) <= CHUNK * b * b < b**3


@pytest.mark.parametrize(
    "strategy, check_vma",
    [("semi_hard", True), ("batch_all", True), ("batch_hard", False), ("random", False)],
)
def test_global_mining_with_shard_map(strategy, check_vma):
    """4 devices each mine their own anchors against the all-gathered batch: same loss and grad.

    Embeddings are ``x @ w`` with ``w`` replicated; each device differentiates
    ``loss_sum_local / psum(count)``. With ``check_vma=True`` shard_map returns the gradient of a
    replicated input already summed over the axis; with ``check_vma=False`` it is psum-ed here.
    """
    if jax.device_count() < 4:
        pytest.skip("needs 4 (fake) devices, see tests/conftest.py")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    labels = jnp.asarray(LABELS["ragged"], jnp.int32)
    x = jnp.asarray(_emb(9, labels, dim=5), jnp.float32)
    w = jnp.asarray(np.random.default_rng(10).normal(size=(5, 3)), jnp.float32)
    kw = dict(strategy=strategy, margin=0.3, key=KEY, soft=strategy == "batch_hard")

    def device_step(w, x_local, labels_local):
        def objective(w):
            e_local = x_local @ w
            e = jax.lax.all_gather(e_local, "data", tiled=True)
            lab = jax.lax.all_gather(labels_local, "data", tiled=True)
            n = e_local.shape[0]
            start = jax.lax.axis_index("data") * n
            terms = triplet_terms(e, lab, anchor_start=start, num_anchors=n, **kw)
            count = jax.lax.psum(jax.lax.stop_gradient(terms.count), "data")
            return terms.loss_sum / jnp.maximum(count, 1.0), terms

        (_, terms), grad = jax.value_and_grad(objective, has_aux=True)(w)
        loss, _ = terms_to_loss(jax.tree.map(lambda t: jax.lax.psum(t, "data"), terms))
        return loss, grad if check_vma else jax.lax.psum(grad, "data")

    specs = dict(in_specs=(P(), P("data"), P("data")), out_specs=(P(), P()))
    step = jax.jit(jax.shard_map(device_step, mesh=mesh, check_vma=check_vma, **specs))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    loss, grad = step(put(w, P()), put(x, P("data")), put(labels, P("data")))
    want_loss, want_grad = jax.value_and_grad(lambda w: triplet_loss(x @ w, labels, **kw)[0])(w)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-5)
