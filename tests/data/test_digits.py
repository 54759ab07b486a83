"""The bundled digit sources: single digits and two-digit numbers, through the shared reader."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from configs import default
from facenet_jax.data import digits, input_pipeline, records


def _split_labels(ds, split):
    return ds.labels[ds.splits[split]]


@pytest.fixture(scope="module")
def single():
    cfg = default.get_config()
    cfg.data.source = "digits"
    return input_pipeline.create_dataset(cfg), cfg


@pytest.fixture(scope="module")
def pairs():
    cfg = default.get_config()  # source digit_pairs, the default
    return input_pipeline.create_dataset(cfg), cfg


def test_digits_splits_hold_disjoint_classes(single):
    ds, cfg = single
    assert isinstance(ds, records.RecordDataset)
    train_labels = set(_split_labels(ds, "train").tolist())
    test_labels = set(_split_labels(ds, "test").tolist())
    assert train_labels == set(cfg.data.train_classes)
    assert test_labels == set(range(10)) - train_labels
    np.testing.assert_array_equal(ds.splits["val"], ds.splits["test"])
    assert ds.split_info("train")["num_images"] + ds.split_info("test")["num_images"] == 1797
    assert ds.image_shape == (16, 16, 1)
    img = ds.source[ds.splits["train"]]
    assert img.min() >= -1 and img.max() <= 1 and img.dtype == np.float32


def test_digit_images_are_the_bundled_digits_resized():
    """Reference: at image_size 8 the records are exactly the bundled pixels / 16 * 2 - 1."""
    cfg = default.get_config()
    cfg.data.source = "digits"
    cfg.data.image_size = 8
    ds = input_pipeline.create_dataset(cfg)
    raw = load_digits()
    np.testing.assert_allclose(ds.source[..., 0], raw.images / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(ds.labels, raw.target)


def test_bad_classes_and_channels_fail_with_field_name():
    cfg = default.get_config()
    cfg.data.source = "digits"
    cfg.data.train_classes = tuple(range(10))
    with pytest.raises(ValueError, match="train_classes"):
        input_pipeline.create_dataset(cfg)
    cfg = default.get_config()
    cfg.data.channels = 3
    with pytest.raises(ValueError, match="config.data.channels"):
        input_pipeline.create_dataset(cfg)


def test_digit_pairs_hold_out_unseen_numbers_written_with_unseen_images():
    target = load_digits().target
    plan = digits.digit_pair_plan(target, seed=0, num_val=10, num_test=10, per_number=5)
    numbers = {name: set(rows[0].tolist()) for name, rows in plan.items()}
    assert [len(numbers[s]) for s in ("train", "val", "test")] == [80, 10, 10]
    assert numbers["train"] | numbers["val"] | numbers["test"] == set(range(100))
    assert not numbers["train"] & (numbers["val"] | numbers["test"])
    assert not numbers["val"] & numbers["test"]
    for labels, left, right in plan.values():
        assert len(labels) == 5 * len(set(labels.tolist()))
        np.testing.assert_array_equal(target[left], labels // 10)  # tens digit on the left
        np.testing.assert_array_equal(target[right], labels % 10)
    train_images = set(plan["train"][1]) | set(plan["train"][2])
    held_images = {int(i) for name in ("val", "test") for i in np.concatenate(plan[name][1:])}
    assert not train_images & held_images
    again = digits.digit_pair_plan(target, seed=0, num_val=10, num_test=10, per_number=5)
    np.testing.assert_array_equal(again["test"][1], plan["test"][1])


def test_digit_pairs_dataset_shapes_and_labels(pairs):
    ds, cfg = pairs
    n = cfg.data.digit_pair_images
    assert ds.split_info("train") | {"identity_names": None} == {
        "num_images": 80 * n,
        "num_identities": 80,
        "identity_names": None,
        "group_names": ["all"],
    }
    assert ds.split_info("test")["num_identities"] == 10
    assert ds.image_shape == (cfg.data.image_size, cfg.data.image_size, 1)
    img = ds.source[ds.splits["test"]]
    assert img.min() >= -1 and img.max() <= 1 and img.dtype == np.float32
    batches = ds.train_batches(0)
    batch = next(batches)
    batches.close()
    labels = batch["label"].reshape(cfg.data.identities_per_batch, -1)
    assert np.all(labels == labels[:, :1])
    assert set(labels[:, 0].tolist()) <= set(_split_labels(ds, "train").tolist())


def test_digit_pair_records_follow_the_plan(pairs):
    """Reference: record j of a split is the plan's left and right digits side by side."""
    ds, cfg = pairs
    raw = load_digits()
    plan = digits.digit_pair_plan(raw.target, cfg.data.split_seed, 10, 10, 60)
    for split in ("train", "val", "test"):
        numbers, left, right = plan[split]
        np.testing.assert_array_equal(_split_labels(ds, split), numbers)
    # At image_size 16 the 8x16 pair is resized; check the pixel layout at the native size.
    j = 7
    numbers, left, right = plan["test"]
    pair = np.concatenate([raw.images[left[j]], raw.images[right[j]]], axis=1)  # [8, 16]
    small = digits._resize_batch(pair[None, :, :, None].astype(np.float32), 16)[0, :, :, 0]
    np.testing.assert_allclose(ds.source[ds.splits["test"][j], :, :, 0], small / 8.0 - 1.0)


def test_digit_pairs_bad_fields_fail_with_field_name():
    cfg = default.get_config()
    cfg.data.digit_pair_images = 1
    with pytest.raises(ValueError, match="config.data.digit_pair_images"):
        input_pipeline.create_dataset(cfg)
    cfg = default.get_config()
    cfg.data.test_fraction = 0.0
    with pytest.raises(ValueError, match="test_fraction"):
        input_pipeline.create_dataset(cfg)
