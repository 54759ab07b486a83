"""pairwise_distances against the obvious ||x - y|| over explicit differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facenet_jax.distances import pairwise_distances


def _brute(a, b, squared):
    sq = np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)
    return sq if squared else np.sqrt(sq)


@pytest.mark.parametrize("squared", [True, False])
def test_matches_brute_force_square_and_rectangular(squared):
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = rng.normal(size=(9, 5))
        y = rng.normal(size=(6, 5))
        got = np.asarray(pairwise_distances(jnp.asarray(x), squared=squared))
        np.testing.assert_allclose(got, _brute(x, x, squared), rtol=1e-10, atol=1e-12)
        got = np.asarray(pairwise_distances(jnp.asarray(x), jnp.asarray(y), squared=squared))
        np.testing.assert_allclose(got, _brute(x, y, squared), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("squared", [True, False])
def test_self_distances_are_exact_zeros(squared):
    # Large, non-representable values make ||x||^2 - 2 x.x + ||x||^2 round away from 0.
    x = jax.random.normal(jax.random.key(1), (16, 64)) * 37.1 + 3.3
    d = pairwise_distances(x, squared=squared)
    assert np.all(np.diag(np.asarray(d)) == 0.0)
    block = jax.jit(lambda s: pairwise_distances(x[4:8], x, squared, row_offset=s))(4)
    np.testing.assert_array_equal(np.asarray(block)[np.arange(4), 4 + np.arange(4)], 0.0)
    np.testing.assert_allclose(np.asarray(block), np.asarray(d)[4:8], rtol=1e-5, atol=1e-2)
    assert np.all(np.asarray(d) >= 0.0)


@pytest.mark.parametrize("squared", [True, False])
def test_gradient_finite_for_coinciding_embeddings(squared):
    x = jnp.array([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [3.0, -1.0]])
    grad = jax.grad(
        lambda e: jnp.sum(pairwise_distances(e, squared=squared) * jnp.arange(25.0).reshape(5, 5))
    )(x)
    assert np.all(np.isfinite(np.asarray(grad)))
    # Away from coinciding points the gradient is the analytic one.
    w = np.arange(25.0).reshape(5, 5)
    xn = np.asarray(x)
    diff = xn[:, None, :] - xn[None, :, :]
    dist = np.sqrt(np.sum(diff**2, -1))
    if squared:
        coef = 2.0 * np.ones_like(dist)
    else:
        coef = np.divide(1.0, dist, out=np.zeros_like(dist), where=dist > 0)
    expected = np.sum(((w + w.T) * coef)[:, :, None] * diff, axis=1)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-4)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="embeddings must be"):
        pairwise_distances(jnp.ones((3, 2)), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="embeddings must be"):
        pairwise_distances(jnp.ones((3,)))
