"""Identity and image splits: partitions, disjoint identities, per-group rounding, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from configs import default
from facenet_jax.data import splits
from facenet_jax.data.spec import DataSpec


def _is_partition(parts, n):
    joined = np.concatenate([parts[s] for s in splits.SPLITS])
    return sorted(joined.tolist()) == list(range(n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identity_split_is_disjoint_stratified_and_deterministic(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 8, size=60)
    labels = np.repeat(np.arange(60), counts)
    groups = labels % 3
    kw = dict(by="identity", val_fraction=0.2, test_fraction=0.1, seed=seed, min_images=2)
    parts = splits.split_indices(labels, groups, **kw)
    assert _is_partition(parts, len(labels))
    ids = {s: set(labels[parts[s]].tolist()) for s in splits.SPLITS}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]
    small = set(np.flatnonzero(counts < 2).tolist())
    assert not small & ids["train"], "identities with < 2 images must not be trained on"
    for g in range(3):
        eligible = [i for i in range(60) if i % 3 == g and counts[i] >= 2]
        held = [i for i in eligible if i in ids["val"]]
        assert len(held) == int(np.floor(0.2 * len(eligible) + 0.5))
    again = splits.split_indices(labels, groups, **kw)
    for s in splits.SPLITS:
        np.testing.assert_array_equal(parts[s], again[s])


def test_image_split_keeps_identities_and_two_training_images():
    counts = np.array([1, 2, 3, 10, 25])
    labels = np.repeat(np.arange(5), counts)
    parts = splits.split_indices(
        labels, by="image", val_fraction=0.2, test_fraction=0.2, seed=0, min_images=2
    )
    assert _is_partition(parts, len(labels))
    for ident, n in enumerate(counts):
        in_train = int((labels[parts["train"]] == ident).sum())
        if n < 2:
            assert in_train == 0 and (labels[parts["test"]] == ident).sum() == n
        else:
            assert in_train >= 2
    assert int((labels[parts["val"]] == 4).sum()) == 5  # round(0.2 * 25)


def test_bad_split_fields_raise():
    with pytest.raises(ValueError, match="split_by"):
        splits.split_indices(np.zeros(4), by="pixel")
    with pytest.raises(ValueError, match="val_fraction"):
        splits.split_indices(np.zeros(4), val_fraction=0.6, test_fraction=0.5)


def test_split_for_spec_reads_the_spec_fields():
    spec = DataSpec.from_config(default.get_config().data)
    spec = dataclasses.replace(spec, split_by="image", split_seed=4, min_images_per_identity=3)
    labels = np.repeat(np.arange(6), [2, 3, 4, 5, 6, 7])
    want = splits.split_indices(
        labels, None, by="image", val_fraction=0.1, test_fraction=0.1, seed=4, min_images=3
    )
    got = splits.split_for_spec(labels, None, spec)
    for s in splits.SPLITS:
        np.testing.assert_array_equal(got[s], want[s])
