"""ResNet with basic blocks (He et al. 2016): ResNet-10/18/34 embedding backbones."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from facenet_jax.models.head import EmbeddingHead
from facenet_jax.models.layers import Conv, batch_norm, max_pool


class ResidualBlock(nn.Module):
    """Pre-activation-free basic block (He et al. 2016): conv3x3-BN-ReLU-conv3x3-BN + shortcut."""

    filters: int
    strides: int
    norm: Callable[..., nn.Module]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = functools.partial(Conv, use_bias=False, dtype=self.dtype)
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
            x = Conv(self.width, (7, 7), strides=2, use_bias=False, dtype=self.dtype)(x)
            x = nn.relu(norm()(x))
            x = max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        else:
            x = Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(x)
            x = nn.relu(norm()(x))
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = 2 if i > 0 and j == 0 else 1
                x = ResidualBlock(self.width * 2**i, strides, norm=norm, dtype=self.dtype)(x)
        return EmbeddingHead(self.embedding_dim, dtype=self.dtype, pooling=self.pooling)(x)
