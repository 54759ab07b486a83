"""DataSpec: every config file converts, missing/unknown/invalid fields are named, pickling."""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import pickle

import ml_collections
import pytest

from configs import default
from facenet_jax.data import face_detection
from facenet_jax.data.spec import AUGMENTATIONS, CROPS, DataSpec, as_spec

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
NAMES = sorted(p.stem for p in CONFIGS.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", NAMES)
def test_every_config_file_gives_a_spec_with_its_values(name):
    data = importlib.import_module(f"configs.{name}").get_config().data
    spec = DataSpec.from_config(data)
    for field in dataclasses.fields(DataSpec):
        value = data[field.name]
        want = tuple(value) if isinstance(value, (list, tuple)) else value
        assert getattr(spec, field.name) == want, field.name


def test_the_spec_declares_exactly_the_default_fields():
    # configs/default.py is the one place defaults live; the spec has none of its own.
    fields = dataclasses.fields(DataSpec)
    assert {f.name for f in fields} == set(default.get_config().data.keys())
    assert all(f.default is dataclasses.MISSING for f in fields)


def test_a_config_json_round_trip_gives_the_same_spec():
    data = default.get_config().data
    loaded = ml_collections.ConfigDict(json.loads(data.to_json()))  # tuples come back as lists
    assert DataSpec.from_config(loaded) == DataSpec.from_config(data)
    assert DataSpec.from_config(data.to_dict()) == DataSpec.from_config(data)


def test_spec_is_frozen_hashable_and_picklable():
    spec = DataSpec.from_config(default.get_config().data)
    assert pickle.loads(pickle.dumps(spec)) == spec and hash(spec) == hash(spec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.image_size = 32
    assert spec.image_shape == (16, 16, 1) and spec.batch_size == 96 and spec.min_images == 2
    assert as_spec(spec) is spec and as_spec(default.get_config().data) == spec


def test_missing_and_unknown_fields_are_named():
    data = default.get_config().data.to_dict()
    del data["detector"]
    with pytest.raises(ValueError, match=r"missing field\(s\) \['detector'\]"):
        DataSpec.from_config(data)
    data = default.get_config().data.to_dict()
    data["image_szie"] = 32
    with pytest.raises(ValueError, match="image_szie"):
        DataSpec.from_config(data)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("image_size", "16", "config.data.image_size: must be int"),
        ("image_size", 0, "config.data.image_size"),
        ("channels", 2, "config.data.channels"),
        ("crop", "face", "config.data.crop.*" + CROPS[-1]),
        ("detector", "retinaface", "config.data.detector.*mtcnn"),
        ("augment", ("flip", "rotate"), "config.data.augment.*rotate"),
        ("augment", "flip", "config.data.augment: must be a tuple"),
        ("split_by", "pixel", "config.data.split_by"),
        ("val_fraction", 0.95, "val_fraction / test_fraction"),
        ("center_crop_fraction", 0.0, "config.data.center_crop_fraction"),
        ("images_per_identity", 1, "config.data.images_per_identity"),
        ("sample_with_replacement", 1, "config.data.sample_with_replacement: must be bool"),
        ("num_workers", -1, "config.data.num_workers"),
        ("affine_degrees", -1.0, "config.data.affine_degrees: must be >= 0"),
        ("affine_scale", -0.1, "config.data.affine_scale: must be >= 0"),
        ("rotation_classes", 3, r"config.data.rotation_classes: allowed: \[1, 2, 4\]"),
        ("groups_per_batch", -1, "config.data.groups_per_batch: must be >= 0"),
        ("groups_per_batch", 4, r"config.data.groups_per_batch: \(G\) must divide .*\(P\) = 6"),
    ],
)
def test_invalid_values_are_named(field, value, match):
    data = default.get_config().data.to_dict()
    data[field] = value
    with pytest.raises(ValueError, match=match):
        DataSpec.from_config(data)
    with pytest.raises(ValueError, match=match):  # A variant of a valid spec is checked too.
        dataclasses.replace(DataSpec.from_config(default.get_config().data), **{field: value})


def test_allowed_names_are_the_tables():
    assert set(AUGMENTATIONS) == {"random_crop", "flip", "color", "affine"}
    spec = DataSpec.from_config(default.get_config().data)
    for name in face_detection.DETECTORS:
        assert dataclasses.replace(spec, detector=name).detector == name
    for crop in CROPS:
        assert dataclasses.replace(spec, crop=crop).crop == crop
