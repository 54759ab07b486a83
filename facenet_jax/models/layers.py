"""Shared layers and conventions of every backbone: compute dtypes, BatchNorm, L2 normalisation,
and the convolution and max-pool that every backbone uses (``Conv``, ``max_pool``).

``Conv`` and ``max_pool`` compute the same forward pass as ``nn.Conv`` and ``nn.max_pool`` (the
same ``lax`` ops, bit for bit) with the same parameters; only their gradients are formulated for
speed on XLA:CPU (docs/bench_train_step.md measures why):

* the kernel gradient of a convolution is written as matrix products over kernel rows instead of
  XLA's backward-filter convolution (whose window is the whole image; YNNPACK runs it several
  times slower than the forward convolution);
* the max-pool gradient is a mask of each window's first maximum times the incoming gradient,
  summed back onto the input grid, instead of ``select_and_scatter`` (which XLA:CPU expands into
  a variadic reduce-window, an iota and a scatter).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    """x / max(||x||_2, eps) along the last axis, in float32 (safe gradient at x = 0)."""
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def batch_norm(train: bool, dtype: Any, axis_name: str | None) -> Callable[..., nn.Module]:
    """BatchNorm factory: batch statistics (synchronised over ``axis_name``) when training,
    running averages otherwise."""
    return functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=0.9,
        dtype=dtype,
        axis_name=axis_name if train else None,
    )


class PReLU(nn.Module):
    """Parametric ReLU with one learnt slope per channel (He et al. 2015): ``max(x, 0) + a_c
    min(x, 0)``, ``a`` [C] float32 initialised to 0.25, applied in ``dtype``. (``nn.PReLU`` learns
    a single slope; the face backbones, as their papers, learn one per channel.)"""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        init = nn.initializers.constant(0.25)
        slope = self.param("negative_slope", init, (x.shape[-1],), jnp.float32)
        return jnp.where(x >= 0, x, slope.astype(self.dtype) * x)


# ----------------------------------------------------------------------------- convolution

_DIMS = ("NHWC", "HWIO", "NHWC")


Padding = str | int | Sequence[tuple[int, int]]


def _pairs(padding: Padding, in_hw: Sequence[int], window: tuple, strides: tuple) -> tuple:
    """Explicit ((lo, hi), (lo, hi)) spatial padding, as ``lax`` resolves "SAME" / "VALID"."""
    if isinstance(padding, str):
        return tuple(tuple(p) for p in lax.padtype_to_pads(in_hw, window, strides, padding))
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _tap(xp: jax.Array, i: int, j: int, strides: tuple, out_hw: tuple) -> jax.Array:
    """xp[:, s_h p + i, s_w q + j, :] for p < OH, q < OW: the input under window tap (i, j)."""
    (sh, sw), (oh, ow) = strides, out_hw
    xi = lax.slice_in_dim(xp, i, i + sh * (oh - 1) + 1, sh, axis=1)
    return lax.slice_in_dim(xi, j, j + sw * (ow - 1) + 1, sw, axis=2)


def _conv(x: jax.Array, kernel: jax.Array, strides: tuple, pads: tuple, groups: int) -> jax.Array:
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=_DIMS, feature_group_count=groups
    )


# Bytes of one kernel row's patches per chunk of images: small enough to stay in the CPU's
# cache between being written and being read by the matrix product (measured best at 1-3 MB on
# the project's CPU, docs/bench_train_step.md).
KERNEL_GRAD_CHUNK_BYTES = 3 << 20


def _images_per_chunk(batch: int, image_bytes: int, chunk_bytes: int) -> int:
    """The largest divisor n of ``batch`` with n * image_bytes <= chunk_bytes (at least 1)."""
    fits = max(1, chunk_bytes // max(1, image_bytes))
    return max(n for n in range(1, batch + 1) if batch % n == 0 and n <= fits)


def conv_kernel_grad(
    x: jax.Array,
    g: jax.Array,
    kernel_shape: tuple,
    strides: tuple,
    pads: tuple,
    chunk_bytes: int | None = None,
) -> jax.Array:
    """dL/dW of y = conv(x, W) (stride s, padding ``pads``, one group) as matrix products.

    With xp = x zero-padded, y[b,p,q,o] = sum_{i,j,c} xp[b, s p + i, s q + j, c] W[i,j,c,o], so

        dW[i,j,c,o] = sum_{b,p,q} xp[b, s p + i, s q + j, c] g[b,p,q,o].

    For each kernel row i the patches P_i[(b,p,q), (j,c)] = xp[b, s p + i, s q + j, c]
    ([N, KW C], N = B OH OW) are gathered and dW[i]^T = g^T P_i ([O, N] @ [N, KW C]). The batch
    is cut into chunks of n images (a ``lax.scan``, dW summed over chunks in float32) so that a
    chunk's patches (n OH OW KW C elements, at most ``chunk_bytes``) are still in cache when
    the product reads them: writing all of P_i to memory and reading it back cost 2-3x the
    products themselves (docs/bench_train_step.md, section 1).

    Args:
      x: [B, H, W, C] input; g: [B, OH, OW, O] gradient of y; kernel_shape: (KH, KW, C, O).
      chunk_bytes: patch bytes per chunk; default ``KERNEL_GRAD_CHUNK_BYTES``.
    Returns:
      [KH, KW, C, O] in x's dtype, accumulated in float32.
    """
    kh, kw, c, o = kernel_shape
    batch, out_hw = x.shape[0], g.shape[1:3]
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))

    def rows(xc: jax.Array, gc: jax.Array) -> jax.Array:  # [KH, O, KW C], float32
        gt = gc.reshape(-1, o).T
        out = []
        for i in range(kh):
            taps = [_tap(xc, i, j, strides, out_hw) for j in range(kw)]
            patches = taps[0] if kw == 1 else jnp.concatenate(taps, axis=-1)
            out.append(
                jnp.matmul(gt, patches.reshape(-1, kw * c), preferred_element_type=jnp.float32)
            )
        return jnp.stack(out)

    copies = kh * kw > 1 or strides != (1, 1) or any(p != (0, 0) for p in pads)
    image_bytes = out_hw[0] * out_hw[1] * kw * c * x.dtype.itemsize
    limit = KERNEL_GRAD_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    n = _images_per_chunk(batch, image_bytes, limit) if copies else batch
    if n == batch:
        dw = rows(xp, g)
    else:
        chunks = (xp.reshape(batch // n, n, *xp.shape[1:]), g.reshape(batch // n, n, *out_hw, o))
        init = jnp.zeros((kh, o, kw * c), jnp.float32)
        dw, _ = lax.scan(lambda acc, xg: (acc + rows(*xg), None), init, chunks)
    return dw.reshape(kh, o, kw, c).transpose(0, 2, 3, 1).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple, pads: tuple) -> jax.Array:
    """``lax.conv_general_dilated`` (NHWC x HWIO -> NHWC, explicit ``pads``, one group) whose
    kernel gradient is ``conv_kernel_grad``; the input gradient is lax's own transpose."""
    return _conv(x, kernel, strides, pads, 1)


def _conv2d_fwd(x, kernel, strides, pads):
    return _conv(x, kernel, strides, pads, 1), (x, kernel)


def _conv2d_bwd(strides, pads, residuals, g):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _conv(x, kernel, strides, pads, 1), x)
    (dx,) = input_vjp(g)
    return dx, conv_kernel_grad(x, g, kernel.shape, strides, pads).astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _out_hw(in_hw: Sequence[int], window: tuple, strides: tuple, pads: tuple) -> tuple:
    return tuple(
        (n + lo + hi - k) // st + 1
        for n, k, st, (lo, hi) in zip(in_hw, window, strides, pads, strict=True)
    )


def _depthwise_taps(xp: jax.Array, kernel: jax.Array, strides: tuple, out_hw: tuple) -> jax.Array:
    """sum_{i,j} xp[:, s p + i, s q + j, :] * kernel[i, j, 0, :], accumulated in float32."""
    kh, kw = kernel.shape[:2]
    y = jnp.zeros((xp.shape[0], *out_hw, xp.shape[-1]), jnp.float32)
    for i in range(kh):
        for j in range(kw):
            y = y + _tap(xp, i, j, strides, out_hw).astype(jnp.float32) * kernel[i, j, 0]
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv2d(x: jax.Array, kernel: jax.Array, strides: tuple, pads: tuple) -> jax.Array:
    """Depthwise convolution (one filter per channel, ``feature_group_count = C``) as taps.

        y[b,p,q,c] = sum_{i,j} xp[b, s p + i, s q + j, c] W[i,j,0,c]

    with xp = x zero-padded by ``pads``. Shapes: x [B, H, W, C], kernel [KH, KW, 1, C] ->
    [B, OH, OW, C]. The KH KW shifted products fuse into one loop; XLA:CPU's grouped convolution
    (forward and both gradients) is 8-21x slower than this at MobileFaceNet's shapes
    (docs/bench_train_step.md, table 1). Gradients, also tap sums (float32 accumulation):

        dx  = crop(sum_{i,j} gd[:, h + KH-1-i, w + KW-1-j] W[i,j,0])   (gd: g dilated by s,
                                                                        padded by KH-1, KW-1)
        dW[i,j,0,c] = sum_{b,p,q} xp[b, s p + i, s q + j, c] g[b,p,q,c]
    """
    out_hw = _out_hw(x.shape[1:3], kernel.shape[:2], strides, pads)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    return _depthwise_taps(xp, kernel.astype(jnp.float32), strides, out_hw).astype(x.dtype)


def _depthwise_fwd(x, kernel, strides, pads):
    return depthwise_conv2d(x, kernel, strides, pads), (x, kernel)


def _depthwise_bwd(strides, pads, residuals, g):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    (h, w), out_hw = x.shape[1:3], g.shape[1:3]
    (plh, phh), (plw, phw) = pads
    hp, wp = h + plh + phh, w + plw + phw
    # Dilate g by the stride and pad it so that a stride-1 correlation with the flipped kernel
    # gives the gradient of the padded input, [B, hp, wp, C]; rows/columns of xp that no window
    # reached (hp - s (OH - 1) - KH of them at the end) get zeros from the high padding.
    cfg = (
        (0, 0, 0),
        (kh - 1, hp - strides[0] * (out_hw[0] - 1) - 1, strides[0] - 1),
        (kw - 1, wp - strides[1] * (out_hw[1] - 1) - 1, strides[1] - 1),
        (0, 0, 0),
    )
    gd = lax.pad(g, jnp.zeros((), g.dtype), cfg)
    flipped = kernel[::-1, ::-1].astype(jnp.float32)
    dxp = _depthwise_taps(gd, flipped, (1, 1), (hp, wp))
    dx = dxp[:, plh : plh + h, plw : plw + w].astype(x.dtype)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    g32 = g.astype(jnp.float32)
    dw = [
        [
            jnp.sum(_tap(xp, i, j, strides, out_hw).astype(jnp.float32) * g32, (0, 1, 2))
            for j in range(kw)
        ]
        for i in range(kh)
    ]
    return dx, jnp.asarray(dw)[:, :, None, :].astype(kernel.dtype)


depthwise_conv2d.defvjp(_depthwise_fwd, _depthwise_bwd)


class Conv(nn.Module):
    """2-D convolution with ``nn.Conv``'s parameters (``kernel`` [KH, KW, C/groups, F], optional
    ``bias`` [F]), initialisers and forward pass; one group uses ``conv2d``'s fast gradient,
    depthwise (groups = C = F) ``depthwise_conv2d``, other groupings ``lax`` as ``nn.Conv``.

    Shapes: [B, H, W, C] -> [B, H', W', F]. Drop-in for the ``nn.Conv`` arguments the backbones
    use; old checkpoints load because the parameter tree is the same (the class is also named
    Conv, so automatic names stay ``Conv_0``, ``Conv_1``, ...).
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.linear.default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel_hw = tuple(self.kernel_size)
        if x.ndim != 4 or len(kernel_hw) != 2:
            raise ValueError(
                f"Conv expects [B, H, W, C] inputs and a 2-D kernel, got {x.shape} and {kernel_hw}"
            )
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
        groups = self.feature_group_count
        kernel_shape = (*kernel_hw, x.shape[-1] // groups, self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        pads = _pairs(self.padding, x.shape[1:3], kernel_hw, strides)
        if groups == 1:
            y = conv2d(x, kernel, strides, pads)
        elif groups == x.shape[-1] == self.features:
            y = depthwise_conv2d(x, kernel, strides, pads)
        else:
            y = _conv(x, kernel, strides, pads, groups)
        return y if bias is None else y + bias


# ----------------------------------------------------------------------------- max-pool


def _reduce_window_max(x, window, strides, pads):
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0))
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: jax.Array, window: tuple, strides: tuple, pads: tuple) -> jax.Array:
    return _reduce_window_max(x, window, strides, pads)


def _max_pool_fwd(x, window, strides, pads):
    y = _reduce_window_max(x, window, strides, pads)
    return y, (x, y)


def _max_pool_bwd(window, strides, pads, residuals, g):
    """dx = sum over taps t of scatter_t(g * [x_t == y and no earlier tap of the window was]).

    Each window's gradient goes to its first maximum in row-major window order, as XLA's
    ``select_and_scatter`` with ``>=`` does; overlapping windows add up.
    """
    x, y = residuals
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    (hp, wp), (sh, sw), (oh, ow) = xp.shape[1:3], strides, y.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    found = jnp.zeros(y.shape, bool)
    dxp = None
    for i in range(window[0]):
        for j in range(window[1]):
            hit = (_tap(xp, i, j, strides, (oh, ow)) == y) & ~found
            found = found | hit
            contribution = jnp.where(hit, g, zero)
            placed = lax.pad(
                contribution,
                zero,
                (
                    (0, 0, 0),
                    (i, hp - i - sh * (oh - 1) - 1, sh - 1),
                    (j, wp - j - sw * (ow - 1) - 1, sw - 1),
                    (0, 0, 0),
                ),
            )
            dxp = placed if dxp is None else dxp + placed
    (top, _), (left, _) = pads
    return (dxp[:, top : top + x.shape[1], left : left + x.shape[2]],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(
    x: jnp.ndarray,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: Padding = "VALID",
) -> jnp.ndarray:
    """``nn.max_pool`` over [B, H, W, C] (same forward: ``lax.reduce_window``, -inf padding) with
    a gradient that XLA:CPU runs as fused elementwise ops (see ``_max_pool_bwd``)."""
    window = tuple(window_shape)
    strides = tuple(strides) if strides is not None else (1,) * len(window)
    if x.ndim != 4 or len(window) != 2 or len(strides) != 2:
        raise ValueError(
            f"max_pool expects [B, H, W, C] and 2-D windows, got {x.shape}, {window}, {strides}"
        )
    return _max_pool(x, window, strides, _pairs(padding, x.shape[1:3], window, strides))
