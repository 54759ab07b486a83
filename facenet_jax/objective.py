"""What the train step minimises: the loss terms of ``config.train.loss`` and their weights
(``LossSettings``, static), and the class labels 0..C-1 of the margin-softmax terms.

Objective: ``triplet_weight * L_triplet + margin_weight * L_margin`` (docs/losses.md).
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
import numpy as np

from facenet_jax import (
    losses,
)
from facenet_jax.data import input_pipeline, sampling
from facenet_jax.labels import IGNORE_LABEL


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The objective the step computes (static, hashable: bound with ``functools.partial``).

    ``objective = triplet_weight * L_triplet + margin_weight * L_margin``, each term a mean over
    the global batch (``scope=global``) or a mean over devices of per-device means (``local``).
    The triplet terms are mined, and their diagnostics logged, even when ``triplet_weight`` is 0
    (the term then takes no part in the objective).
    """

    mining: str = "semi_hard"  # losses.STRATEGIES.
    margin: float = 0.2
    squared: bool = True
    soft: bool = False
    scope: str = "global"  # MINING_SCOPES.
    triplet_weight: float = 1.0
    margin_kind: str = ""  # losses.MARGIN_KINDS, "" for no margin-softmax term.
    margin_weight: float = 0.0
    margin_scale: float = 30.0  # s.
    margin_m: float = 0.0  # m; 0 for the kinds without one (softmax, normface).
    easy_margin: bool = False

    @classmethod
    def from_config(cls, train_config: ml_collections.ConfigDict) -> LossSettings:
        t = train_config
        terms = loss_terms(t)
        kind = next((name for name in terms if name != "triplet"), "")
        return cls(
            t.mining,
            float(t.margin),
            bool(t.squared),
            bool(t.soft),
            t.mining_scope,
            triplet_weight=terms.get("triplet", 0.0),
            margin_kind=kind,
            margin_weight=terms.get(kind, 0.0),
            margin_scale=float(t.margin_scale),
            margin_m=float(t.margin_m) if kind in MARGIN_KINDS_WITH_M else 0.0,
            easy_margin=bool(t.easy_margin),
        )


LOSS_TERMS = ("triplet", *losses.MARGIN_KINDS)
MARGIN_KINDS_WITH_M = ("cosface", "arcface")


def loss_terms(train_config: ml_collections.ConfigDict) -> dict[str, float]:
    """``train.loss`` ("triplet", "cosface", "triplet+arcface", ...) and ``train.loss_weights``
    -> ``{term: weight}`` in the order written, e.g. ``{"triplet": 1.0, "arcface": 0.5}``.

    Raises ValueError naming the field: unknown or repeated term, two margin-softmax kinds, a
    weight count that does not match the terms, a weight that is not positive.
    """
    t = train_config
    if not isinstance(t.loss, str) or not t.loss.strip():
        raise ValueError(
            f"config.train.loss must be a string of terms joined by '+', e.g. 'triplet+arcface'; "
            f"got {t.loss!r}"
        )
    names = [name.strip() for name in t.loss.split("+")]
    for name in names:
        if name not in LOSS_TERMS:
            raise ValueError(
                f"config.train.loss: unknown term {name!r} in {t.loss!r}; allowed: "
                f"{list(LOSS_TERMS)}, alone or joined by '+' (e.g. 'triplet+cosface')"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"config.train.loss: a term is repeated in {t.loss!r}")
    kinds = [name for name in names if name != "triplet"]
    if len(kinds) > 1:
        raise ValueError(
            f"config.train.loss: at most one margin-softmax kind (one class-weight matrix), got "
            f"{kinds} in {t.loss!r}"
        )
    weights = tuple(t.loss_weights) or (1.0,) * len(names)
    if len(weights) != len(names):
        raise ValueError(
            f"config.train.loss_weights: {len(weights)} weights {tuple(weights)} for the "
            f"{len(names)} terms of config.train.loss={t.loss!r} (one per term, or () for all 1)"
        )
    for name, w in zip(names, weights, strict=True):
        if not (isinstance(w, int | float) and np.isfinite(w) and w > 0):
            raise ValueError(
                f"config.train.loss_weights: the weight of {name!r} must be a positive number, "
                f"got {w!r} (leave a term out of config.train.loss to drop it)"
            )
    return {name: float(w) for name, w in zip(names, weights, strict=True)}


def validate_margin_softmax(t: ml_collections.ConfigDict) -> None:
    kind = next((name for name in loss_terms(t) if name != "triplet"), "")
    if kind and kind != "softmax" and not t.margin_scale > 0:
        raise ValueError(f"config.train.margin_scale (s) must be > 0, got {t.margin_scale}")
    if kind == "cosface" and not t.margin_m >= 0:
        raise ValueError(f"config.train.margin_m: cosface's margin must be >= 0, got {t.margin_m}")
    if kind == "arcface" and not 0 <= t.margin_m < math.pi / 2:
        raise ValueError(
            "config.train.margin_m: arcface's margin is an angle in radians in [0, pi/2), "
            f"got {t.margin_m}"
        )
    if t.easy_margin and kind != "arcface":
        raise ValueError(
            "config.train.easy_margin is only defined for arcface, but config.train.loss is "
            f"{t.loss!r}"
        )


def training_classes(labels: np.ndarray, train_indices: np.ndarray, min_images: int) -> np.ndarray:
    """[C] sorted identity labels of the training identities: class c is identity ``out[c]``.

    The identities the PK sampler draws (``records.RecordDataset``): those with at least
    ``min_images`` images in the training split. ``labels`` [N] is every record's identity,
    ``train_indices`` the training split's records.
    """
    ids, counts = np.unique(np.asarray(labels)[np.asarray(train_indices)], return_counts=True)
    return ids[(counts >= min_images) & (ids != IGNORE_LABEL)]


def dataset_classes(dataset: input_pipeline.FaceDataset) -> np.ndarray:
    """[C] sorted labels of the training batches of a ``records.RecordDataset`` (every source
    builds one): ``training_classes``, and with ``spec.rotation_classes`` R > 1 each identity i
    as the R classes i * R + r of its turned images (C = R x the training identities)."""
    ids = training_classes(dataset.labels, dataset.splits["train"], dataset.spec.min_images)
    turns = dataset.spec.rotation_classes
    return sampling.turned(ids[:, None], np.arange(turns), turns).reshape(-1)


def to_class_labels(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """[B] identity labels -> [B] int32 class indices into ``classes`` (sorted), and
    ``IGNORE_LABEL`` for any label that is not a training class (padding included).

    Over the training identities this is a bijection, so the triplet loss (which only compares
    labels) is unchanged; the margin-softmax losses need indices 0..C-1.
    """
    labels, classes = np.asarray(labels), np.asarray(classes)
    if not len(classes):
        return np.full(labels.shape, IGNORE_LABEL, np.int32)
    pos = np.minimum(np.searchsorted(classes, labels), len(classes) - 1)
    return np.where(classes[pos] == labels, pos, IGNORE_LABEL).astype(np.int32)
