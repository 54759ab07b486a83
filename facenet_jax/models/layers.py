"""Shared layers and conventions of every backbone: compute dtypes, BatchNorm, L2 normalisation."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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
