"""Embedding networks: a CNN backbone, a dense projection to d, and L2 normalisation.

Every model maps images ``[B, H, W, C]`` float32 in [-1, 1] to embeddings ``[B, d]`` float32 with
``||f(x)||_2 = 1``. Models are looked up by name in ``MODELS`` (``config.model.name``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import ml_collections

from facenet_jax.models.head import POOLINGS, EmbeddingHead
from facenet_jax.models.inception_resnet import InceptionResNetV1
from facenet_jax.models.iresnet import IResNet
from facenet_jax.models.layers import DTYPES, batch_norm, l2_normalize
from facenet_jax.models.mobilefacenet import MobileFaceNet
from facenet_jax.models.resnet import ResidualBlock, ResNet
from facenet_jax.models.small_cnn import SmallCNN

__all__ = [
    "DTYPES",
    "MODELS",
    "POOLINGS",
    "EmbeddingHead",
    "IResNet",
    "InceptionResNetV1",
    "MobileFaceNet",
    "ResNet",
    "ResidualBlock",
    "SmallCNN",
    "batch_norm",
    "create_model",
    "l2_normalize",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet10": functools.partial(ResNet, stage_sizes=(1, 1, 1, 1)),
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2)),
    "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3)),
    # Face backbones at their published widths: inception_resnet_v1 32, mobilefacenet and ir* 64.
    "inception_resnet_v1": InceptionResNetV1,
    "mobilefacenet": MobileFaceNet,
    "ir18": functools.partial(IResNet, stage_sizes=(2, 2, 2, 2)),
    "ir34": functools.partial(IResNet, stage_sizes=(3, 4, 6, 3)),
    "ir50": functools.partial(IResNet, stage_sizes=(3, 4, 14, 3)),
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
