"""layers.Conv / layers.max_pool against nn.Conv / nn.max_pool and slow obvious references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facenet_jax.models import layers

# (H, C_in, F, kernel, stride, padding, bias, groups)
CONVS = [
    (9, 3, 8, (3, 3), 1, "SAME", False, 1),
    (10, 5, 7, (3, 3), 2, "SAME", True, 1),
    (11, 4, 6, (7, 7), 2, "SAME", False, 1),
    (8, 6, 5, (1, 1), 2, "SAME", False, 1),
    (9, 4, 4, (3, 3), 2, "VALID", True, 1),
    (6, 3, 4, (2, 3), 1, ((1, 0), (0, 2)), False, 1),
    (7, 6, 6, (3, 3), 1, 1, False, 6),  # depthwise: depthwise_conv2d
    (8, 5, 5, (3, 3), 2, "SAME", True, 5),  # depthwise, stride 2 (MobileFaceNet's down-sampling)
    (9, 4, 4, (3, 3), 2, "VALID", False, 4),  # depthwise, stride 2, rows no window reaches
    (6, 3, 3, (2, 3), 1, ((1, 0), (0, 2)), False, 3),  # depthwise, asymmetric padding
    (4, 6, 6, (4, 4), 1, "VALID", False, 6),  # depthwise GDConv: kernel as large as the map
    (5, 4, 8, (5, 5), 1, "VALID", False, 4),  # 2 filters per group: lax's own gradient
]


def _loss(module):
    """A scalar with a non-trivial cotangent: sum(sin(f(x)))."""
    return lambda variables, x: jnp.sum(jnp.sin(module.apply(variables, x)))


@pytest.mark.parametrize("h,c,f,kernel,stride,padding,bias,groups", CONVS)
def test_conv_matches_nn_conv(h, c, f, kernel, stride, padding, bias, groups):
    x = jax.random.normal(jax.random.key(0), (3, h, h, c))
    kw = dict(strides=stride, padding=padding, use_bias=bias, feature_group_count=groups)
    ref, new = nn.Conv(f, kernel, **kw), layers.Conv(f, kernel, **kw)
    v_ref, v_new = ref.init(jax.random.key(1), x), new.init(jax.random.key(1), x)
    # Same parameter tree, shapes and initial values: old checkpoints load.
    assert jax.tree.structure(v_ref) == jax.tree.structure(v_new)
    for a, b in zip(jax.tree.leaves(v_ref), jax.tree.leaves(v_new), strict=True):
        np.testing.assert_array_equal(a, b)
    if groups == c == f:  # Depthwise: tap sums, another float32 summation order.
        np.testing.assert_allclose(ref.apply(v_ref, x), new.apply(v_ref, x), rtol=1e-5, atol=1e-6)
    else:  # Same forward pass, bit for bit.
        np.testing.assert_array_equal(ref.apply(v_ref, x), new.apply(v_ref, x))
    # Same gradients (w.r.t. parameters and input) up to float32 summation order.
    g_ref = jax.grad(_loss(ref), argnums=(0, 1))(v_ref, x)
    g_new = jax.jit(jax.grad(_loss(new), argnums=(0, 1)))(v_ref, x)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_new), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _kernel_grad_reference(x, g, kernel_hw, strides, pads):
    """dW[i,j,c,o] = sum_{b,p,q} xp[b, s p + i, s q + j, c] g[b,p,q,o], loops in float64."""
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), *pads, (0, 0)))
    g = np.asarray(g, np.float64)
    (sh, sw), (_, oh, ow, _) = strides, g.shape
    dw = np.zeros((*kernel_hw, x.shape[-1], g.shape[-1]))
    for i in range(kernel_hw[0]):
        for j in range(kernel_hw[1]):
            tap = xp[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
            dw[i, j] = np.einsum("bpqc,bpqo->co", tap, g)
    return dw


@pytest.mark.parametrize(
    "kernel_hw,strides,pads",
    [
        ((3, 3), (1, 1), ((1, 1), (1, 1))),
        ((7, 7), (2, 2), ((3, 2), (3, 2))),
        ((1, 3), (2, 1), ((0, 0), (2, 0))),
    ],
)
@pytest.mark.parametrize("chunk_bytes", [None, 1, 1500])
def test_conv_kernel_grad_matches_loops(kernel_hw, strides, pads, chunk_bytes):
    # chunk_bytes 1: one image per chunk (a 6-step scan); 1500: the largest divisor of 6 whose
    # patches fit (1, 2 or 3 images, by kernel); None: the default, one chunk at this size.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 12, 10, 3)).astype(np.float32)
    hp, wp = 12 + sum(pads[0]), 10 + sum(pads[1])
    out_hw = ((hp - kernel_hw[0]) // strides[0] + 1, (wp - kernel_hw[1]) // strides[1] + 1)
    g = rng.normal(size=(6, *out_hw, 5)).astype(np.float32)
    fast = layers.conv_kernel_grad(
        jnp.asarray(x), jnp.asarray(g), (*kernel_hw, 3, 5), strides, pads, chunk_bytes
    )
    assert fast.shape == (*kernel_hw, 3, 5) and fast.dtype == jnp.float32
    np.testing.assert_allclose(
        fast, _kernel_grad_reference(x, g, kernel_hw, strides, pads), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "batch,image_bytes,chunk_bytes,expected",
    [(128, 393_216, 3 << 20, 8), (128, 4 << 20, 3 << 20, 1), (6, 500, 1500, 3), (7, 10, 50, 1)],
)
def test_images_per_chunk_is_the_largest_fitting_divisor(batch, image_bytes, chunk_bytes, expected):
    assert layers._images_per_chunk(batch, image_bytes, chunk_bytes) == expected


def test_conv_bfloat16_gradients_close_to_nn_conv():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
    ref = nn.Conv(32, (3, 3), use_bias=False, dtype=jnp.bfloat16)
    new = layers.Conv(32, (3, 3), use_bias=False, dtype=jnp.bfloat16)
    v = ref.init(jax.random.key(1), x)
    np.testing.assert_array_equal(ref.apply(v, x), new.apply(v, x))
    g_ref = jax.grad(_loss(ref))(v, x)["params"]["kernel"]
    g_new = jax.grad(_loss(new))(v, x)["params"]["kernel"]
    assert g_new.dtype == jnp.float32  # params stay float32
    np.testing.assert_allclose(g_new, g_ref, rtol=0.05, atol=0.05 * float(jnp.abs(g_ref).max()))


def _depthwise_reference(x, w, strides, pads):
    """y[b,p,q,c] = sum_{i,j} xp[b, s p + i, s q + j, c] w[i,j,0,c], loops in float64."""
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), *pads, (0, 0)))
    kh, kw = w.shape[:2]
    oh = (xp.shape[1] - kh) // strides[0] + 1
    ow = (xp.shape[2] - kw) // strides[1] + 1
    y = np.zeros((x.shape[0], oh, ow, x.shape[-1]))
    for p in range(oh):
        for q in range(ow):
            win = xp[:, strides[0] * p : strides[0] * p + kh, strides[1] * q : strides[1] * q + kw]
            y[:, p, q] = np.einsum("bijc,ijc->bc", win, np.asarray(w, np.float64)[:, :, 0])
    return y


@pytest.mark.parametrize(
    "kernel_hw,strides,pads",
    [
        ((3, 3), (1, 1), ((1, 1), (1, 1))),
        ((3, 3), (2, 2), ((0, 1), (1, 1))),
        ((2, 4), (1, 3), ((0, 0), (2, 1))),
    ],
)
def test_depthwise_conv2d_value_and_gradients_match_loops(kernel_hw, strides, pads):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 9, 10, 3)).astype(np.float32)
    w = rng.normal(size=(*kernel_hw, 1, 3)).astype(np.float32)
    y = layers.depthwise_conv2d(jnp.asarray(x), jnp.asarray(w), strides, pads)
    ref = _depthwise_reference(x, w, strides, pads)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # Gradients of <y, c> for a fixed cotangent c. y is linear in x (and in w), so the reference
    # gradient's entry k is <reference(e_k), c> with e_k the k-th basis array.
    cot = rng.normal(size=ref.shape)
    dx, dw = jax.grad(
        lambda x, w: jnp.sum(layers.depthwise_conv2d(x, w, strides, pads) * cot), argnums=(0, 1)
    )(jnp.asarray(x), jnp.asarray(w))
    e = lambda a, i: np.eye(a.size)[i].reshape(a.shape)  # noqa: E731
    ref_dx = [np.sum(_depthwise_reference(e(x, i), w, strides, pads) * cot) for i in range(x.size)]
    ref_dw = [np.sum(_depthwise_reference(x, e(w, i), strides, pads) * cot) for i in range(w.size)]
    np.testing.assert_allclose(dx, np.reshape(ref_dx, x.shape), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.reshape(ref_dw, w.shape), rtol=1e-5, atol=1e-4)


def test_conv_rejects_non_2d_inputs():
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        layers.Conv(4, (3, 3)).init(jax.random.key(0), jnp.zeros((2, 8, 3)))


# ----------------------------------------------------------------------------- max-pool

POOLS = [
    ((2, 2), (2, 2), "SAME", 8),
    ((2, 2), (2, 2), "SAME", 9),
    ((3, 3), (2, 2), "SAME", 11),
    ((3, 3), (2, 2), "VALID", 12),
    ((3, 3), (1, 1), "SAME", 7),
]


def _pool_input(h):
    """ReLU-like input: exact zeros (ties in most windows) and a block of equal positive values."""
    x = jnp.maximum(jax.random.normal(jax.random.key(2), (2, h, h, 3)), 0.0)
    return x.at[0, :4, :4, 0].set(1.0)


def _first_max_reference(x, g, window, strides, pads):
    """Each window's gradient to its first maximum in row-major order, loops in numpy."""
    xp = np.pad(np.asarray(x), ((0, 0), *pads, (0, 0)), constant_values=-np.inf)
    dxp = np.zeros_like(xp)
    b, oh, ow, c = g.shape
    for n, p, q, k in np.ndindex(b, oh, ow, c):
        win = xp[
            n,
            p * strides[0] : p * strides[0] + window[0],
            q * strides[1] : q * strides[1] + window[1],
            k,
        ]
        i, j = np.unravel_index(np.argmax(win), win.shape)  # argmax returns the first maximum
        dxp[n, p * strides[0] + i, q * strides[1] + j, k] += g[n, p, q, k]
    (top, _), (left, _) = pads
    return dxp[:, top : top + x.shape[1], left : left + x.shape[2]]


@pytest.mark.parametrize("window,strides,padding,h", POOLS)
def test_max_pool_matches_nn_max_pool_including_ties(window, strides, padding, h):
    x = _pool_input(h)
    y_ref = nn.max_pool(x, window, strides, padding)
    np.testing.assert_array_equal(layers.max_pool(x, window, strides, padding), y_ref)
    g = jax.random.normal(jax.random.key(3), y_ref.shape)
    dx_ref = jax.grad(lambda x: jnp.sum(nn.max_pool(x, window, strides, padding) * g))(x)
    dx_new = jax.jit(jax.grad(lambda x: jnp.sum(layers.max_pool(x, window, strides, padding) * g)))(
        x
    )
    np.testing.assert_allclose(dx_new, dx_ref, rtol=1e-6, atol=1e-6)
    pads = jax.lax.padtype_to_pads((h, h), window, strides, padding)
    np.testing.assert_allclose(
        dx_new, _first_max_reference(x, np.asarray(g), window, strides, pads), rtol=1e-6, atol=1e-6
    )
