"""IR-ResNet (insightface / ArcFace, Deng et al. 2019): IR-18/34/50 face embedding backbones.

The "improved residual" unit is BN-conv3x3-BN-PReLU-conv3x3(stride)-BN plus a shortcut (conv1x1 +
BN when the shape changes), with no activation after the sum. The stem is one conv3x3 at stride 1
(faces are small: 112x112 keeps a 7x7 map after the four stride-2 stages), and the output layer is
ArcFace's "E": BN-Dropout-FC-BN over the *flattened* last map, so the FC dominates the parameter
count (25.7M of IR-50's 43.6M at 512-d and 112x112). Published sizes: width 64 (stages 64, 128,
256, 512), 512-d embeddings, 112x112 inputs.

Shapes: images [B, H, W, C] -> embeddings [B, d] float32, L2-normalised; H and W divisible by 16
are best (64x64 gives a 4x4 last map).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from facenet_jax.models.layers import Conv, PReLU, batch_norm, l2_normalize


class IRBlock(nn.Module):
    """Improved residual unit ``shortcut(x) + BN(conv_s(PReLU(BN(conv(BN(x))))))``.

    [B, H, W, C] -> [B, H/s, W/s, F]; the shortcut is conv1x1_s-BN when the shape changes.
    """

    filters: int
    strides: int
    norm: Callable[..., nn.Module]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = functools.partial(Conv, use_bias=False, dtype=self.dtype)
        y = self.norm()(x)
        y = conv(self.filters, (3, 3))(y)
        y = PReLU(dtype=self.dtype)(self.norm()(y))
        y = conv(self.filters, (3, 3), strides=self.strides)(y)
        y = self.norm()(y)
        if x.shape[-1] != self.filters or self.strides != 1:
            x = conv(self.filters, (1, 1), strides=self.strides, name="shortcut")(x)
            x = self.norm(name="shortcut_bn")(x)
        return x + y


class IResNet(nn.Module):
    """IR-ResNet; ``stage_sizes`` (3, 4, 14, 3) is IR-50, (2, 2, 2, 2) IR-18, (3, 4, 6, 3) IR-34.

    Attributes:
      width: channels of the first stage (published: 64); stage i has ``width * 2**i``.
      embedding_dim: d (published: 512).
      pooling: ``"flatten"`` is ArcFace's output layer E (published: FC over the flattened map);
        ``"avg"`` averages the map first (far fewer parameters, translation invariant).
      dropout_rate: dropout before the FC (insightface: 0); > 0 needs a ``"dropout"`` rng in train.
      bn_axis_name: data axis for synchronised BatchNorm inside ``shard_map``.
    """

    stage_sizes: Sequence[int] = (3, 4, 14, 3)
    width: int = 64
    embedding_dim: int = 512
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    pooling: str = "flatten"
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        if self.pooling not in ("avg", "flatten"):
            raise ValueError(f"IResNet pooling: {self.pooling!r}; allowed: ['avg', 'flatten']")
        norm = batch_norm(train, self.dtype, self.bn_axis_name)
        x = x.astype(self.dtype)
        x = Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(x)
        x = PReLU(dtype=self.dtype)(norm()(x))
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = 2 if j == 0 else 1
                x = IRBlock(self.width * 2**i, strides, norm=norm, dtype=self.dtype)(x)
        x = norm()(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = x.reshape(x.shape[0], -1) if self.pooling == "flatten" else jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.embedding_dim, dtype=self.dtype, name="fc")(x)
        # insightface freezes this BN's scale at 1 (it feeds the L2 normalisation): no scale.
        x = norm(use_scale=False, name="features")(x)
        return l2_normalize(x)
