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
