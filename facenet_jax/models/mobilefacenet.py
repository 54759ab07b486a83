"""MobileFaceNet (Chen et al. 2018): a ~1M-parameter face embedding network for 112x112 faces.

MobileNetV2 inverted residual bottlenecks with PReLU, a stride-2 first conv, and a global
depthwise conv ("GDConv", one learnt weight per position and channel) instead of global average
pooling, because the corner and centre units of a face map should not count the same. Paper,
Table 1 (input 112x112x3)::

    conv3x3 s2 -> 64;  depthwise conv3x3 -> 64
    bottlenecks (t expansion, c channels, n repeats, s stride of the first):
      (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1)
    conv1x1 -> 512;  linear GDConv7x7 -> 512;  linear conv1x1 (an FC) -> 128, BN

Published size: width 64, 128-d: 1,003,136 parameters as written (the paper rounds to 0.99M).
Shapes: images [B, H, W, C] -> embeddings [B, d] float32, L2-normalised (112 -> a 7x7 map before
the GDConv, 64 -> 4x4; the GDConv kernel is the map size).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from facenet_jax.models.layers import Conv, PReLU, batch_norm, l2_normalize

# (expansion t, output channels c at width 64, repeats n, stride s of the first repeat).
BOTTLENECKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class Bottleneck(nn.Module):
    """Inverted residual: conv1x1 (t*C_in)-BN-PReLU, depthwise 3x3 (stride)-BN-PReLU, conv1x1
    (F)-BN (linear); identity shortcut when the shape is kept. [B,H,W,C_in] -> [B,H/s,W/s,F]."""

    filters: int
    expansion: int
    strides: int
    norm: Callable[..., nn.Module]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = functools.partial(Conv, use_bias=False, dtype=self.dtype)
        hidden = x.shape[-1] * self.expansion
        y = PReLU(dtype=self.dtype)(self.norm()(conv(hidden, (1, 1))(x)))
        y = conv(hidden, (3, 3), strides=self.strides, feature_group_count=hidden)(y)
        y = PReLU(dtype=self.dtype)(self.norm()(y))
        y = self.norm()(conv(self.filters, (1, 1))(y))
        if self.strides == 1 and x.shape[-1] == self.filters:
            return x + y
        return y


class MobileFaceNet(nn.Module):
    """MobileFaceNet; every channel count is scaled by ``width / 64``.

    Attributes:
      width: channels of the first conv (published: 64).
      embedding_dim: d (published: 128).
      pooling: ``"flatten"`` is the published GDConv (keeps the spatial layout: one weight per
        position and channel); ``"avg"`` replaces it by global average pooling (the paper's
        weaker baseline).
      dropout_rate: dropout before the final FC (paper: none); > 0 needs a ``"dropout"`` rng.
      bottlenecks: the (t, c, n, s) table at width 64.
      bn_axis_name: data axis for synchronised BatchNorm inside ``shard_map``.
    """

    width: int = 64
    embedding_dim: int = 128
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    pooling: str = "flatten"
    dropout_rate: float = 0.0
    bottlenecks: Sequence[tuple[int, int, int, int]] = BOTTLENECKS

    def _channels(self, c: int) -> int:
        return max(1, round(c * self.width / 64))

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        if self.pooling not in ("avg", "flatten"):
            raise ValueError(
                f"MobileFaceNet pooling: {self.pooling!r}; allowed: ['avg', 'flatten']"
            )
        norm = batch_norm(train, self.dtype, self.bn_axis_name)
        conv = functools.partial(Conv, use_bias=False, dtype=self.dtype)
        x = x.astype(self.dtype)
        c = self._channels(64)
        x = PReLU(dtype=self.dtype)(norm()(conv(c, (3, 3), strides=2)(x)))
        x = PReLU(dtype=self.dtype)(norm()(conv(c, (3, 3), feature_group_count=c)(x)))
        for t, channels, n, s in self.bottlenecks:
            for j in range(n):
                x = Bottleneck(self._channels(channels), t, s if j == 0 else 1, norm, self.dtype)(x)
        c = self._channels(512)
        x = PReLU(dtype=self.dtype)(norm()(conv(c, (1, 1))(x)))
        if self.pooling == "flatten":  # GDConv: a depthwise conv whose kernel is the whole map.
            x = conv(c, x.shape[1:3], padding="VALID", feature_group_count=c, name="gdconv")(x)
            x = norm()(x).reshape(x.shape[0], -1)
        else:
            x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.embedding_dim, use_bias=False, dtype=self.dtype, name="linear")(x)
        return l2_normalize(norm(name="features")(x))
