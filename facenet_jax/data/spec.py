"""``DataSpec``: ``config.data`` typed, validated once, frozen and picklable.

Everything in ``facenet_jax.data`` (sources, the grain reader and its worker processes,
preprocessing) and everything that loads images for a trained run (inference, the CLI) receives a
``DataSpec`` instead of the ``ml_collections`` config. ``configs/default.py`` stays the single place
where defaults are declared: the spec has no defaults of its own, so a field missing from the
config is an error naming it, as is a field the spec does not know (a typo, or a field added to the
default config but not here).

    spec = DataSpec.from_config(config.data)
    spec.image_shape          # (image_size, image_size, channels)
    dataclasses.replace(spec, crop="center")   # a variant, validated again

The allowed values of the enumerated fields are declared here, next to the fields: ``CROPS``,
``AUGMENTATIONS``, ``SPLIT_BY`` and ``ROTATION_CLASSES``; detector names are the keys of
``face_detection.DETECTORS`` and source names those of ``input_pipeline.SOURCES`` (checked where
the dataset is created).
"""

from __future__ import annotations

import dataclasses
import numbers
import typing
from collections.abc import Mapping
from typing import Any

from facenet_jax.data import alignment, face_detection

CROPS = ("none", "center", "detect", "align")  # config.data.crop; see preprocessing.crop_box.
AUGMENTATIONS = ("random_crop", "flip", "color", "affine")  # config.data.augment.
SPLIT_BY = ("identity", "image")  # config.data.split_by; see splits.split_indices.
ROTATION_CLASSES = (1, 2, 4)  # config.data.rotation_classes; see records.RecordDataset.


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The ``config.data`` fields, typed; each is documented in ``configs/default.py``."""

    source: str
    root: str
    group_depth: int
    tfds_name: str
    tfds_split: str
    tfds_image_key: str
    tfds_label_key: str
    tfds_group_key: str
    data_dir: str
    prepare_workers: int
    train_classes: tuple[int, ...]
    digit_pair_images: int
    split_by: str
    split_seed: int
    val_fraction: float
    test_fraction: float
    image_size: int
    channels: int
    crop: str
    detector: str
    detect_margin: float
    align_margin: float
    center_crop_fraction: float
    identities_per_batch: int
    images_per_identity: int
    sample_with_replacement: bool
    min_images_per_identity: int
    augment: tuple[str, ...]
    random_crop_padding: int
    affine_degrees: float
    affine_scale: float
    rotation_classes: int
    groups_per_batch: int
    num_workers: int
    prefetch: int

    def __post_init__(self):
        """Coerces every field to its type (JSON lists -> tuples) and checks every value."""
        for name, kind in _FIELD_TYPES.items():
            object.__setattr__(self, name, _coerce(name, getattr(self, name), kind))
        counts = (
            "group_depth",
            "prepare_workers",
            "random_crop_padding",
            "groups_per_batch",
            "num_workers",
            "prefetch",
        )
        for name in counts:
            _check(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        _check(self.split_by in SPLIT_BY, "split_by", f"allowed: {list(SPLIT_BY)}", self.split_by)
        fractions = (self.val_fraction, self.test_fraction)
        _check(
            min(fractions) >= 0 and sum(fractions) < 1,
            "val_fraction / test_fraction",
            "must be >= 0 with a sum < 1",
            fractions,
        )
        _check(self.affine_degrees >= 0, "affine_degrees", "must be >= 0", self.affine_degrees)
        _check(self.affine_scale >= 0, "affine_scale", "must be >= 0", self.affine_scale)
        _check(
            self.rotation_classes in ROTATION_CLASSES,
            "rotation_classes",
            f"allowed: {list(ROTATION_CLASSES)} (1 = off)",
            self.rotation_classes,
        )
        _check(self.image_size >= 1, "image_size", "must be >= 1", self.image_size)
        _check(self.channels in (1, 3), "channels", "must be 1 (grey) or 3 (RGB)", self.channels)
        _check(self.crop in CROPS, "crop", f"unknown crop; allowed: {list(CROPS)}", self.crop)
        detectors = list(face_detection.DETECTORS)
        _check(
            self.detector in detectors,
            "detector",
            f"unknown detector; allowed: {detectors}",
            self.detector,
        )
        _check(self.detect_margin >= 0, "detect_margin", "must be >= 0", self.detect_margin)
        _check(self.align_margin > -1, "align_margin", "must be > -1", self.align_margin)
        landmarks = list(alignment.LANDMARK_DETECTORS)
        _check(
            self.crop != "align" or self.detector in landmarks,
            "detector",
            f"crop='align' needs a 5-landmark detector; allowed: {landmarks}",
            self.detector,
        )
        _check(
            0 < self.center_crop_fraction <= 1,
            "center_crop_fraction",
            "must be in (0, 1]",
            self.center_crop_fraction,
        )
        p, k = self.identities_per_batch, self.images_per_identity
        _check(p >= 1, "identities_per_batch", "(P) must be >= 1", p)
        _check(k >= 2, "images_per_identity", "(K) must be >= 2 so anchors have positives", k)
        g = self.groups_per_batch
        _check(
            g == 0 or p % g == 0,
            "groups_per_batch",
            f"(G) must divide identities_per_batch (P) = {p}: P / G identities from each group",
            g,
        )
        bad = [a for a in self.augment if a not in AUGMENTATIONS]
        _check(not bad, "augment", f"unknown augmentation(s); allowed: {list(AUGMENTATIONS)}", bad)

    @classmethod
    def from_config(cls, data: Mapping[str, Any] | Any) -> DataSpec:
        """The spec of ``config.data`` (a ConfigDict or a dict, e.g. from a run's config.json).

        Raises ValueError naming every missing or unknown field, or the first invalid value.
        """
        given = dict(data.items())
        names = set(_FIELD_TYPES)
        missing, unknown = sorted(names - set(given)), sorted(set(given) - names)
        if missing:
            raise ValueError(
                f"config.data is missing field(s) {missing}; configs/default.py declares every "
                "field (a config.json written by an older version? add them with their defaults)"
            )
        if unknown:
            raise ValueError(
                f"config.data has unknown field(s) {unknown}; a new field must be declared in "
                "configs/default.py and in facenet_jax/data/spec.py:DataSpec"
            )
        return cls(**given)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The model input of one image: (image_size, image_size, channels)."""
        return (self.image_size, self.image_size, self.channels)

    @property
    def batch_size(self) -> int:
        """The global training batch, P * K."""
        return self.identities_per_batch * self.images_per_identity

    @property
    def min_images(self) -> int:
        """Images an identity needs to be sampled for training: max(2, min_images_per_identity)."""
        return max(2, self.min_images_per_identity)


_FIELD_TYPES = typing.get_type_hints(DataSpec)  # {field name: its type}, in declaration order.


def _check(ok: bool, field: str, what: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"config.data.{field}: {what} (got {value!r})")


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """``value`` as ``kind`` (int, float, bool, str or a tuple of int/str), or a ValueError."""
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ValueError(
                f"config.data.{name}: must be a tuple of {item.__name__} (got {value!r})"
            )
        return tuple(_coerce(name, v, item) for v in value)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(f"config.data.{name}: must be {kind.__name__} (got {value!r})")
    return kind(value)


def as_spec(data: DataSpec | Mapping[str, Any] | Any) -> DataSpec:
    """``data`` itself when it is a DataSpec, else ``DataSpec.from_config(data)``."""
    return data if isinstance(data, DataSpec) else DataSpec.from_config(data)
