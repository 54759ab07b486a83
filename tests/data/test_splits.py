"""Identity and image splits: partitions, disjoint identities, per-group rounding, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from configs import default
from facenet_jax.data import sampling, splits
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


# ------------------------------------------------------------------------------ feasibility


def _spec(**fields):
    spec = DataSpec.from_config(default.get_config().data)
    return dataclasses.replace(spec, **{"source": "folder", **fields})


def _feasible(labels, spec, eval_split="test", parts=None):
    try:
        splits.check_feasible(labels, None, spec, eval_split, parts)
        return True
    except ValueError:
        return False


def test_p_larger_than_the_train_identities_names_the_field_and_a_value_that_works():
    labels = np.repeat(np.arange(12), 4)
    spec = _spec(identities_per_batch=10, images_per_identity=4, test_fraction=0.2)
    with pytest.raises(ValueError) as e:
        splits.check_feasible(labels, None, spec, "test", what="faces/")
    message = str(e.value)
    assert "config.data.identities_per_batch (P) = 10" in message
    assert "train split of faces/ has 9 identities" in message
    assert "set config.data.identities_per_batch <= 9" in message
    assert "config.data.val_fraction / config.data.test_fraction" in message
    assert "sample_with_replacement" not in message  # Already True: not a fix.
    assert _feasible(labels, dataclasses.replace(spec, identities_per_batch=9))
    # Without replacement, identities with fewer than K images cannot be drawn: suggested then.
    few = np.repeat(np.arange(12), [2] * 6 + [5] * 6)
    strict = _spec(
        identities_per_batch=6,
        images_per_identity=4,
        sample_with_replacement=False,
        test_fraction=0.2,
    )
    with pytest.raises(ValueError, match="set config.data.sample_with_replacement=True"):
        splits.check_feasible(few, None, strict, "test")
    assert _feasible(few, dataclasses.replace(strict, sample_with_replacement=True))


@pytest.mark.parametrize("turns", [2, 4])
def test_rotation_classes_multiply_the_identities_p_is_checked_against(turns):
    # records.RecordDataset samples each drawable identity as `turns` identities (its turned
    # images): 9 training identities give 9 * turns sampled ones, and P is checked against those.
    labels = np.repeat(np.arange(12), 4)
    spec = _spec(
        identities_per_batch=9 * turns,
        images_per_identity=4,
        test_fraction=0.2,
        rotation_classes=turns,
    )
    assert _feasible(labels, spec)
    splits.check_listing(labels, None, spec, "test", what="faces/")  # Does not raise.
    parts = splits.split_for_spec(labels, np.zeros_like(labels), spec)
    by_identity = sampling.group_by_label(labels[parts["train"]], 4).values()
    entries = [sampling.turned(idx, r, turns) for idx in by_identity for r in range(turns)]
    batch = sampling.pk_batch_indices(entries, p=9 * turns, k=4, seed=0, step=0)
    assert len(np.unique(batch.reshape(9 * turns, 4)[:, 0] % turns)) == turns  # All turns drawn.
    too_many = dataclasses.replace(spec, identities_per_batch=9 * turns + 1)
    for check in (splits.check_feasible, splits.check_listing):
        with pytest.raises(ValueError) as e:
            check(labels, None, too_many, "test", what="faces/")
        message = str(e.value)
        assert (
            f"has 9 identities with >= 2 images (x config.data.rotation_classes = {turns}: "
            f"{9 * turns} sampled identities)" in message
        )
        assert f"set config.data.identities_per_batch <= {9 * turns}" in message


def test_too_few_held_out_identities_suggest_the_smallest_fraction_that_works():
    labels = np.repeat(np.arange(12), 3)
    spec = _spec(identities_per_batch=4, val_fraction=0.1, test_fraction=0.1)
    # round(0.1 * 12) = 1 identity in test: no different pair.
    with pytest.raises(ValueError) as e:
        splits.check_feasible(labels, None, spec, "test")
    message = str(e.value)
    assert "config.eval.split = 'test'" in message and "holds 1 identities" in message
    suggested = float(message.split("to ")[-1].split(";")[0].split()[0])
    assert "raise config.data.test_fraction (now 0.1)" in message
    # The suggestion is the smallest multiple of 0.05 that works (checked one by one here).
    works = [
        f
        for f in np.arange(2, 18) * 0.05
        if _feasible(labels, dataclasses.replace(spec, test_fraction=round(float(f), 2)))
    ]
    assert suggested == pytest.approx(works[0])
    # Three identities in all: no fraction works; the message says so instead of a value.
    with pytest.raises(ValueError, match="add identities"):
        splits.check_feasible(
            np.repeat(np.arange(3), 4), None, _spec(identities_per_batch=2), "val"
        )
    with pytest.raises(ValueError, match="config.eval.split"):
        splits.check_feasible(labels, None, spec, "holdout")


def test_fixed_splits_are_checked_as_given():
    labels = np.repeat(np.arange(10), 5)
    parts = {
        "train": np.flatnonzero(labels < 7),
        "val": np.flatnonzero(labels >= 7),
        "test": np.flatnonzero(labels >= 7),
    }
    spec = _spec(source="digits", identities_per_batch=7)
    splits.check_feasible(labels, None, spec, "test", parts)
    with pytest.raises(ValueError, match=r"P\) = 8.*has 7 identities") as e:
        splits.check_feasible(
            labels, None, dataclasses.replace(spec, identities_per_batch=8), "val", parts
        )
    assert "val_fraction" not in str(e.value)  # The digit sources do not split by fraction.


@pytest.mark.parametrize("by", ["identity", "image"])
def test_the_listing_check_never_refuses_what_decoding_could_allow(by):
    """check_listing raises only if every subset of the listed files (what decoding may keep)
    fails check_feasible: brute force over random trees and random subsets."""
    rng = np.random.default_rng(0)
    refused = 0
    for trial in range(40):
        n_ids = int(rng.integers(2, 12))
        labels = np.repeat(np.arange(n_ids), rng.integers(1, 6, n_ids))
        groups = (labels % int(rng.integers(1, 3))).astype(np.int64)
        spec = _spec(
            split_by=by,
            identities_per_batch=int(rng.integers(2, 6)),
            images_per_identity=int(rng.integers(2, 5)),
            sample_with_replacement=bool(rng.integers(2)),
            min_images_per_identity=int(rng.integers(1, 4)),
            val_fraction=float(rng.choice([0.0, 0.1, 0.25])),
            test_fraction=float(rng.choice([0.1, 0.25, 0.4])),
            split_seed=trial,
        )
        eval_split = str(rng.choice(["val", "test"])) if spec.val_fraction else "test"
        try:
            splits.check_listing(labels, groups, spec, eval_split, "tree")
            continue
        except ValueError as e:
            assert "before decoding" in str(e)
        refused += 1
        for _ in range(15):
            keep = rng.random(len(labels)) < rng.uniform(0.3, 1.0)
            kept, kept_groups = labels[keep], groups[keep]
            if len(kept):
                try:
                    splits.check_feasible(kept, kept_groups, spec, eval_split)
                except ValueError:
                    continue
                raise AssertionError(f"refused, but decoding {keep.sum()} files would work")
    assert refused > 5  # The bound is not vacuous.


def test_the_listing_bound_covers_rounding_that_favours_fewer_identities():
    # 10 identities, 0.25 / 0.25: round(2.5) = 3 held out each way, 4 train. With one identity
    # lost to bad files: round(2.25) = 2 each way, 5 train. P = 5 must not be refused early.
    labels = np.repeat(np.arange(10), 3)
    spec = _spec(identities_per_batch=5, val_fraction=0.25, test_fraction=0.25)
    assert not _feasible(labels, spec)
    splits.check_listing(labels, None, spec, "test", "tree")
    assert _feasible(labels[labels != 9], spec)
