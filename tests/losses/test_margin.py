"""Margin-softmax losses against a NumPy reference written with explicit angles.

The reference loops over rows, takes ``theta = arccos(cos)`` and adds the margin to the angle
(ArcFace) or the cosine (CosFace) directly, so it shares no formula with the library's
``cos(theta + m) = cos cos m - sin sin m`` form. Gradients are compared with central finite
differences of the reference, in float64.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facenet_jax import losses
from facenet_jax.data.sampling import IGNORE_LABEL
from facenet_jax.losses import (
    MARGIN_KINDS,
    margin_softmax_loss,
    margin_softmax_terms,
    margin_terms_to_loss,
    normalize_class_weights,
)
from facenet_jax.losses.margin import _target_logit
from facenet_jax.models import l2_normalize

# (kind, scale, margin, easy_margin)
CASES = [
    ("softmax", 1.0, 0.0, False),
    ("normface", 16.0, 0.0, False),
    ("cosface", 16.0, 0.35, False),
    ("arcface", 16.0, 0.5, False),
    ("arcface", 16.0, 0.5, True),
]

# ------------------------------------------------------------------------------ reference


def _ref_target(t, kind, s, m, easy):
    theta = math.acos(min(max(t, -1.0), 1.0))
    if kind == "cosface":
        return s * (t - m)
    if kind == "arcface":
        if easy:
            return s * math.cos(theta + m) if t > 0 else s * t
        return s * math.cos(theta + m) if theta + m < math.pi else s * (t - m * math.sin(m))
    return s * t


def reference(x, y, w, kind, s, m, easy):
    """(loss, accuracy) in float64: mean over non-ignored rows of logsumexp(z) - z_y."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    per_row, correct = [], []
    for i, label in enumerate(np.asarray(y)):
        if label == IGNORE_LABEL:
            continue
        if kind == "softmax":
            z = w @ x[i]
            plain = z.copy()
        else:
            cos = (w / np.linalg.norm(w, axis=1, keepdims=True)) @ x[i]
            plain = s * cos
            z = plain.copy()
            z[label] = _ref_target(cos[label], kind, s, m, easy)
        top = z.max()
        per_row.append(top + math.log(np.sum(np.exp(z - top))) - z[label])
        correct.append(int(np.argmax(plain)) == label)
    if not per_row:
        return 0.0, 0.0
    return float(np.mean(per_row)), float(np.mean(correct))


def finite_difference(f, a, eps=1e-6):
    grad = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        up, down = a.copy(), a.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (f(up) - f(down)) / (2 * eps)
    return grad


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _inputs(seed, b=8, c=5, d=4, ignore=(3,)):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(c, d))
    y = rng.integers(0, c, size=b)
    y[list(ignore)] = IGNORE_LABEL
    x = _unit(rng.normal(size=(b, d)))
    # Row 0 points almost exactly away from its class: theta + m > pi (the ArcFace fallback).
    x[0] = _unit(-w[y[0]] + 0.05 * rng.normal(size=d))
    # Row 1 sits at theta slightly above 90 degrees: cos < 0 (easy_margin keeps cos there).
    v = _unit(rng.normal(size=d))
    v = _unit(v - (v @ _unit(w[y[1]])) * _unit(w[y[1]]))
    x[1] = _unit(v - 0.2 * _unit(w[y[1]]))
    return x, y, w


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("kind,s,m,easy", CASES)
def test_value_and_gradient_match_reference_float64(kind, s, m, easy):
    with jax.enable_x64(True):
        x, y, w = _inputs(0)
        wn = _unit(w)
        assert (x[0] @ wn[y[0]]) < math.cos(math.pi - 0.5) and (x[1] @ wn[y[1]]) < 0
        assert {case[0] for case in CASES} == set(MARGIN_KINDS)
        kw = dict(kind=kind, scale=s, margin=m, easy_margin=easy)

        def loss(x, w):
            return margin_softmax_loss(x, jnp.asarray(y, jnp.int32), w, **kw)

        got, (gx, gw) = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
        want, _ = reference(x, y, w, kind, s, m, easy)
        np.testing.assert_allclose(float(got), want, rtol=1e-12)
        fd_x = finite_difference(lambda a: reference(a, y, w, kind, s, m, easy)[0], x)
        fd_w = finite_difference(lambda a: reference(x, y, a, kind, s, m, easy)[0], w)
        np.testing.assert_allclose(np.asarray(gx), fd_x, atol=1e-7)
        np.testing.assert_allclose(np.asarray(gw), fd_w, atol=1e-7)
        assert np.all(np.asarray(gx)[3] == 0.0)  # the ignored row


@pytest.mark.parametrize("kind,s,m,easy", CASES)
def test_float32_and_diagnostics(kind, s, m, easy):
    x, y, w = _inputs(1, b=16, c=7, d=8, ignore=(2, 9))
    terms = margin_softmax_terms(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(y),
        jnp.asarray(w, jnp.float32),
        kind=kind,
        scale=s,
        margin=m,
        easy_margin=easy,
    )
    loss, diag = margin_terms_to_loss(terms)
    want, accuracy = reference(x, y, w, kind, s, m, easy)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    np.testing.assert_allclose(float(diag["accuracy"]), accuracy, rtol=1e-6)
    assert float(terms.count) == 14
    target_cos = np.sum(_unit(w)[y] * x, axis=1)[y != IGNORE_LABEL]
    np.testing.assert_allclose(float(diag["mean_target_cos"]), target_cos.mean(), rtol=1e-5)


def test_ignored_rows_do_not_count():
    """Padding rows (any values, even inf) change nothing: loss equals the loss of the kept rows."""
    x, y, w = _inputs(2, b=10, ignore=(0, 4, 7))
    w = jnp.asarray(w, jnp.float32)
    keep = y != IGNORE_LABEL
    x_bad = x.copy()
    x_bad[~keep] = np.inf
    kw = dict(kind="arcface", scale=32.0, margin=0.5)
    f = lambda e, lab: margin_softmax_loss(jnp.asarray(e, jnp.float32), jnp.asarray(lab), w, **kw)
    grad = jax.grad(f)(jnp.asarray(x, jnp.float32), jnp.asarray(y))
    np.testing.assert_allclose(float(f(x_bad, y)), float(f(x[keep], y[keep])), rtol=1e-6)
    assert np.all(np.asarray(grad)[~keep] == 0.0)
    assert np.all(np.asarray(grad)[keep] != 0.0)
    all_ignored = np.full_like(y, IGNORE_LABEL)
    value, grad = jax.value_and_grad(f)(jnp.asarray(x, jnp.float32), jnp.asarray(all_ignored))
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_arcface_target_is_decreasing_in_theta():
    """cos(theta + m) turns up past theta = pi - m; the fallback cos - m sin m keeps the target
    logit decreasing over [0, pi] (with a downward step of cos m + m sin m - 1 at the threshold)."""
    theta = np.linspace(0.0, math.pi, 2000)  # float32 cos; pi/2 is not a grid point
    cos = jnp.cos(jnp.asarray(theta))
    for m in (0.2, 0.5, 1.0):
        t = np.asarray(_target_logit(cos, "arcface", m, False))
        assert np.all(np.diff(t) < 1e-6), m
        step = np.min(np.diff(t))
        np.testing.assert_allclose(step, -(math.cos(m) + m * math.sin(m) - 1), atol=5e-3)
        naive = np.cos(theta + m)
        assert np.any(np.diff(naive) > 0)  # what the threshold guards against
        easy = np.asarray(_target_logit(cos, "arcface", m, True))
        obtuse = theta > math.pi / 2
        np.testing.assert_allclose(easy[obtuse], np.cos(theta[obtuse]), atol=1e-5)
        np.testing.assert_allclose(easy[~obtuse], naive[~obtuse], atol=1e-5)


def test_normalize_class_weights():
    w = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(normalize_class_weights(w), [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
    g = jax.grad(lambda w: normalize_class_weights(w).sum())(w)
    assert np.all(np.isfinite(g))


def test_bfloat16_embeddings_give_a_float32_loss_close_to_float32():
    x, y, w = _inputs(3, b=12, c=6, d=16)
    w = jnp.asarray(w, jnp.float32)
    kw = dict(kind="cosface", scale=16.0, margin=0.35)
    lo = margin_softmax_loss(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y), w, **kw)
    hi = margin_softmax_loss(jnp.asarray(x, jnp.float32), jnp.asarray(y), w, **kw)
    assert lo.dtype == jnp.float32
    np.testing.assert_allclose(float(lo), float(hi), rtol=2e-2)


def test_init_class_weights():
    w = losses.init_class_weights(jax.random.key(0), 1000, 64)
    assert w.shape == (1000, 64) and w.dtype == jnp.float32
    np.testing.assert_allclose(float(jnp.std(w)), 0.01, rtol=0.05)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(kind="sphereface"), "unknown margin-softmax kind"),
        (dict(kind="normface", margin=0.3), "not used by kind 'normface'"),
        (dict(kind="arcface", margin=2.0), "radians"),
        (dict(kind="cosface", margin=0.3, easy_margin=True), "easy_margin"),
        (dict(kind="normface", scale=0.0), "scale must be positive"),
        (dict(num_anchors=0), "num_anchors"),
        (dict(anchor_start=7, num_anchors=2), "not inside"),
    ],
)
def test_bad_arguments_raise(kw, match):
    x, y, w = _inputs(4)
    with pytest.raises(ValueError, match=match):
        margin_softmax_terms(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w), **kw)


def test_bad_shapes_raise():
    x, y, w = _inputs(4)
    with pytest.raises(ValueError, match="do not match"):
        margin_softmax_loss(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w[:, :3]))
    with pytest.raises(ValueError, match="labels must be"):
        margin_softmax_loss(jnp.asarray(x), jnp.asarray(y[:5]), jnp.asarray(w))
    with pytest.raises(ValueError, match="labels must be"):
        margin_softmax_loss(jnp.asarray(x), jnp.asarray(y, jnp.float32), jnp.asarray(w))


@pytest.mark.parametrize("kind,check_vma", [("arcface", True), ("cosface", False)])
def test_global_batch_with_shard_map_equals_one_device(kind, check_vma):
    """8 devices: all-gather embeddings and labels, each takes its rows' terms, psum sum/count.

    Embeddings are ``normalise(x @ p)`` with the projection ``p`` and the class weights replicated;
    the loss and both gradients equal the one-device result, with ignored rows on some devices.
    """
    n_dev = 8
    if jax.device_count() < n_dev:
        pytest.skip("needs 8 (fake) devices, see tests/conftest.py")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((n_dev,), ("data",), devices=jax.devices()[:n_dev])
    rng = np.random.default_rng(5)
    b, c = 3 * n_dev, 6
    labels = rng.integers(0, c, size=b).astype(np.int32)
    labels[[1, 2, 10, 23]] = IGNORE_LABEL
    x = jnp.asarray(rng.normal(size=(b, 5)), jnp.float32)
    p = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(c, 4)), jnp.float32)
    kw = dict(kind=kind, scale=16.0, margin=0.4)
    embed = lambda x, p: l2_normalize(x @ p)

    def device_step(p, w, x_local, labels_local):
        def objective(params):
            e = jax.lax.all_gather(embed(x_local, params[0]), "data", tiled=True)
            lab = jax.lax.all_gather(labels_local, "data", tiled=True)
            n = x_local.shape[0]
            start = jax.lax.axis_index("data") * n
            terms = margin_softmax_terms(e, lab, params[1], anchor_start=start, num_anchors=n, **kw)
            count = jax.lax.psum(jax.lax.stop_gradient(terms.count), "data")
            return terms.loss_sum / jnp.maximum(count, 1.0), terms

        (_, terms), grad = jax.value_and_grad(objective, has_aux=True)((p, w))
        loss, _ = margin_terms_to_loss(jax.tree.map(lambda t: jax.lax.psum(t, "data"), terms))
        return loss, grad if check_vma else jax.lax.psum(grad, "data")

    specs = dict(in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), (P(), P())))
    step = jax.jit(jax.shard_map(device_step, mesh=mesh, check_vma=check_vma, **specs))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    loss, (gp, gw) = step(put(p, P()), put(w, P()), put(x, P("data")), put(labels, P("data")))

    def one_device(p, w):
        return margin_softmax_loss(embed(x, p), jnp.asarray(labels), w, **kw)

    want_loss, (want_gp, want_gw) = jax.value_and_grad(one_device, argnums=(0, 1))(p, w)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(gp, want_gp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw, want_gw, rtol=1e-5, atol=1e-6)
