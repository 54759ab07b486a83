"""Embedding networks: a CNN backbone, a dense projection to d, and L2 normalisation.

Every model maps images ``[B, H, W, C]`` float32 in [-1, 1] to embeddings ``[B, d]`` float32 with
``||f(x)||_2 = 1``. Models are looked up by name in ``MODELS`` (``config.model.name``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    """x / max(||x||_2, eps) along the last axis, in float32 (safe gradient at x = 0)."""
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


POOLINGS = ("avg", "flatten")


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


class EmbeddingHead(nn.Module):
    """Pool -> Dense(d) -> L2 normalise: [B, h, w, c] -> [B, d] unit vectors.

    ``pooling="avg"`` averages over space (translation invariant); ``"flatten"`` keeps the
    spatial layout (h*w*c features), which suits small, centred inputs such as digits.
    """

    embedding_dim: int
    dtype: Any = jnp.float32
    pooling: str = "avg"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.pooling == "flatten":
            x = x.reshape(x.shape[0], -1)
        else:
            x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.embedding_dim, dtype=self.dtype, name="projection")(x)
        return l2_normalize(x)


class SmallCNN(nn.Module):
    """Three stages of (conv3x3-BN-ReLU) x 2 + 2x2 max-pool, widths w, 2w, 4w; then the head.

    Small enough to train in minutes on a CPU at 32x32 (digits) or 64x64 (faces).
    """

    width: int = 32
    embedding_dim: int = 128
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None  # Set to the data axis inside shard_map: synchronised BN.
    pooling: str = "avg"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        norm = batch_norm(train, self.dtype, self.bn_axis_name)
        x = x.astype(self.dtype)
        for stage in range(3):
            for _ in range(2):
                x = nn.Conv(self.width * 2**stage, (3, 3), use_bias=False, dtype=self.dtype)(x)
                x = nn.relu(norm()(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        return EmbeddingHead(self.embedding_dim, dtype=self.dtype, pooling=self.pooling)(x)


class ResidualBlock(nn.Module):
    """Pre-activation-free basic block (He et al. 2016): conv3x3-BN-ReLU-conv3x3-BN + shortcut."""

    filters: int
    strides: int
    norm: Callable[..., nn.Module]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        y = conv(self.filters, (3, 3), strides=self.strides)(x)
        y = nn.relu(self.norm()(y))
        y = conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros)(y)
        if x.shape[-1] != self.filters or self.strides != 1:
            x = conv(self.filters, (1, 1), strides=self.strides, name="shortcut")(x)
            x = self.norm(name="shortcut_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet with basic blocks; ``stage_sizes`` (2, 2, 2, 2) is ResNet-18. Stem: conv3x3 (small
    inputs) or conv7x7/2 + max-pool (inputs >= 96 px)."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    embedding_dim: int = 128
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    pooling: str = "avg"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        norm = batch_norm(train, self.dtype, self.bn_axis_name)
        x = x.astype(self.dtype)
        if x.shape[1] >= 96:
            x = nn.Conv(self.width, (7, 7), strides=2, use_bias=False, dtype=self.dtype)(x)
            x = nn.relu(norm()(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        else:
            x = nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(x)
            x = nn.relu(norm()(x))
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = 2 if i > 0 and j == 0 else 1
                x = ResidualBlock(self.width * 2**i, strides, norm=norm, dtype=self.dtype)(x)
        return EmbeddingHead(self.embedding_dim, dtype=self.dtype, pooling=self.pooling)(x)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet10": functools.partial(ResNet, stage_sizes=(1, 1, 1, 1)),
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2)),
    "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3)),
}


def create_model(
    model_config: ml_collections.ConfigDict, bn_axis_name: str | None = None
) -> nn.Module:
    """Builds ``MODELS[config.model.name]``; raises ValueError naming the field on bad values."""
    if model_config.name not in MODELS:
        raise ValueError(
            f"config.model.name: unknown model {model_config.name!r}; allowed: {list(MODELS)}"
        )
    if model_config.dtype not in DTYPES:
        raise ValueError(
            f"config.model.dtype: unknown dtype {model_config.dtype!r}; allowed: {list(DTYPES)}"
        )
    pooling = model_config.get("pooling", "avg")
    if pooling not in POOLINGS:
        raise ValueError(f"config.model.pooling: {pooling!r}; allowed: {list(POOLINGS)}")
    if model_config.embedding_dim < 1 or model_config.width < 1:
        raise ValueError(
            "config.model.embedding_dim and config.model.width must be positive, got "
            f"{model_config.embedding_dim} and {model_config.width}"
        )
    return MODELS[model_config.name](
        width=model_config.width,
        embedding_dim=model_config.embedding_dim,
        dtype=DTYPES[model_config.dtype],
        bn_axis_name=bn_axis_name,
        pooling=pooling,
    )
