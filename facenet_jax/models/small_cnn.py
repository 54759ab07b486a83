"""SmallCNN: a VGG-style network small enough to train in minutes on a CPU."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from facenet_jax.models.head import EmbeddingHead
from facenet_jax.models.layers import Conv, batch_norm, max_pool


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
                x = Conv(self.width * 2**stage, (3, 3), use_bias=False, dtype=self.dtype)(x)
                x = nn.relu(norm()(x))
            x = max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        return EmbeddingHead(self.embedding_dim, dtype=self.dtype, pooling=self.pooling)(x)
