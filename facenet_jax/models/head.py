"""The embedding head shared by every backbone: pool -> Dense(d) -> L2 normalise."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from facenet_jax.models.layers import l2_normalize

POOLINGS = ("avg", "flatten")


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
