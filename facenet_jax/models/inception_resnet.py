"""Inception-ResNet-v1 (Szegedy et al. 2017), the network of FaceNet implementations.

The layout is davidsandberg's ``facenet/src/models/inception_resnet_v1.py`` (as ported by
facenet-pytorch's ``InceptionResnetV1``): a stem, 5 x Block35 (residuals scaled by 0.17),
Reduction-A, 10 x Block17 (0.10), Reduction-B, 5 x Block8 (0.20) and a final Block8 without
ReLU, then global average pooling, dropout, a bias-free FC to d and BatchNorm. Every conv is
conv-BN-ReLU except the 1x1 "up" convs of the residual branches (linear, with bias). At 160x160
the stem and reductions use VALID padding and the last map is 3x3; inputs under 96 px use SAME
padding instead (64x64 -> a 2x2 last map), which changes no parameter.

Published size: width 32 (the stem's first conv), Block35/17/8 at 256/896/1792 channels; every
channel count is scaled by ``width / 32``. 23,482,624 parameters at 512-d (facenet-pytorch, whose
27,910,327 include the 8,631-class VGGFace2 logits), 22,793,728 at FaceNet's 128-d.
Shapes: images [B, H, W, C] -> embeddings [B, d] float32, L2-normalised.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from facenet_jax.models.layers import Conv, batch_norm, l2_normalize, max_pool


class ConvBN(nn.Module):
    """conv (no bias) - BN - ReLU."""

    filters: int
    kernel: tuple[int, int]
    norm: Callable[..., nn.Module]
    strides: int = 1
    padding: str = "SAME"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = Conv(
            self.filters,
            self.kernel,
            strides=self.strides,
            padding=self.padding,
            use_bias=False,
            dtype=self.dtype,
        )(x)
        return nn.relu(self.norm()(x))


class InceptionResidual(nn.Module):
    """``x + scale * up(concat(branches(x)))``, then ReLU (unless ``activate`` is False).

    ``branches`` lists, per branch, its convs as (filters, kernel); ``up`` is a linear conv1x1
    with bias back to the input channels. Block35: three branches of 32; Block17: 128 and
    128-(1x7)-(7x1); Block8: 192 and 192-(1x3)-(3x1) (at width 32).
    """

    branches: Sequence[Sequence[tuple[int, tuple[int, int]]]]
    scale: float
    norm: Callable[..., nn.Module]
    activate: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        outs = []
        for branch in self.branches:
            y = x
            for filters, kernel in branch:
                y = ConvBN(filters, kernel, self.norm, dtype=self.dtype)(y)
            outs.append(y)
        up = Conv(x.shape[-1], (1, 1), dtype=self.dtype, name="up")(jnp.concatenate(outs, -1))
        x = x + self.scale * up
        return nn.relu(x) if self.activate else x


class InceptionResNetV1(nn.Module):
    """Inception-ResNet-v1 embedding network.

    Attributes:
      width: channels of the first stem conv (published: 32); all channels scale with it.
      embedding_dim: d (FaceNet: 128; davidsandberg's released models: 512).
      pooling: ``"avg"`` (published) or ``"flatten"`` of the last map.
      dropout_rate: dropout before the FC (davidsandberg: keep 0.8, i.e. 0.2); > 0 needs a
        ``"dropout"`` rng in train mode.
      repeats: numbers of Block35, Block17 and Block8 (published (5, 10, 5), plus the last Block8).
      bn_axis_name: data axis for synchronised BatchNorm inside ``shard_map``.
    """

    width: int = 32
    embedding_dim: int = 128
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    pooling: str = "avg"
    dropout_rate: float = 0.0
    repeats: tuple[int, int, int] = (5, 10, 5)

    def _c(self, c: int) -> int:
        return max(1, round(c * self.width / 32))

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        if self.pooling not in ("avg", "flatten"):
            raise ValueError(
                f"InceptionResNetV1 pooling: {self.pooling!r}; allowed: ['avg', 'flatten']"
            )
        norm = batch_norm(train, self.dtype, self.bn_axis_name)
        c = self._c
        pad = "VALID" if x.shape[1] >= 96 else "SAME"  # published geometry for full-size faces
        conv = functools.partial(ConvBN, norm=norm, dtype=self.dtype)
        pool = functools.partial(max_pool, window_shape=(3, 3), strides=(2, 2), padding=pad)
        x = x.astype(self.dtype)
        # Stem: 160 -> 79 -> 77 -> 77 -> 38 -> 38 -> 36 -> 17 (VALID).
        x = conv(c(32), (3, 3), strides=2, padding=pad)(x)
        x = conv(c(32), (3, 3), padding=pad)(x)
        x = conv(c(64), (3, 3))(x)
        x = pool(x)
        x = conv(c(80), (1, 1), padding=pad)(x)
        x = conv(c(192), (3, 3), padding=pad)(x)
        x = conv(c(256), (3, 3), strides=2, padding=pad)(x)
        block35 = [[(c(32), (1, 1))], [(c(32), (1, 1)), (c(32), (3, 3))]]
        block35.append([(c(32), (1, 1)), (c(32), (3, 3)), (c(32), (3, 3))])
        for _ in range(self.repeats[0]):
            x = InceptionResidual(block35, 0.17, norm, dtype=self.dtype)(x)
        # Reduction-A (Mixed_6a): 17 -> 8.
        a = conv(c(384), (3, 3), strides=2, padding=pad)(x)
        b = conv(c(256), (3, 3), strides=2, padding=pad)(
            conv(c(192), (3, 3))(conv(c(192), (1, 1))(x))
        )
        x = jnp.concatenate([a, b, pool(x)], axis=-1)
        block17 = [[(c(128), (1, 1))], [(c(128), (1, 1)), (c(128), (1, 7)), (c(128), (7, 1))]]
        for _ in range(self.repeats[1]):
            x = InceptionResidual(block17, 0.10, norm, dtype=self.dtype)(x)
        # Reduction-B (Mixed_7a): 8 -> 3.
        a = conv(c(384), (3, 3), strides=2, padding=pad)(conv(c(256), (1, 1))(x))
        b = conv(c(256), (3, 3), strides=2, padding=pad)(conv(c(256), (1, 1))(x))
        d = conv(c(256), (3, 3), strides=2, padding=pad)(
            conv(c(256), (3, 3))(conv(c(256), (1, 1))(x))
        )
        x = jnp.concatenate([a, b, d, pool(x)], axis=-1)
        block8 = [[(c(192), (1, 1))], [(c(192), (1, 1)), (c(192), (1, 3)), (c(192), (3, 1))]]
        for _ in range(self.repeats[2]):
            x = InceptionResidual(block8, 0.20, norm, dtype=self.dtype)(x)
        x = InceptionResidual(block8, 1.0, norm, activate=False, dtype=self.dtype)(x)
        x = jnp.mean(x, axis=(1, 2)) if self.pooling == "avg" else x.reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.embedding_dim, use_bias=False, dtype=self.dtype, name="bottleneck")(x)
        return l2_normalize(norm(name="bottleneck_bn")(x))
