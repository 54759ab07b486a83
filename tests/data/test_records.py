"""The shared reader: PK batches, resume, process slices, augmentation seeding, workers, padding.

Run on the folder source (tfds records decoded in the reader) and on an in-memory source (decoded
arrays, as the digit sources use), against slow obvious references.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from configs import default
from facenet_jax import objective
from facenet_jax.data import input_pipeline, preprocessing, records, sampling
from facenet_jax.data.spec import DataSpec
from tests.data import trees

SPLITS = ("train", "val", "test")


def _take(iterator, n):
    out = [next(iterator) for _ in range(n)]
    iterator.close()
    return out


def _in_memory(groups=None, **data) -> records.RecordDataset:
    """10 identities x 5 decoded 6x6 grey images; identities 8, 9 held out as val and test;
    ``groups``: [10] group of each identity (default: all in group 0)."""
    spec = DataSpec.from_config(default.get_config().data)
    fields = {"image_size": 6, "identities_per_batch": 4, "images_per_identity": 3, **data}
    spec = dataclasses.replace(spec, **fields)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (50, 6, 6, 1)).astype(np.float32)
    labels = np.repeat(np.arange(10), 5)
    splits = {"train": np.arange(40), "val": np.arange(40, 45), "test": np.arange(45, 50)}
    return records.RecordDataset(
        images,
        lambda x: x,
        labels=labels,
        groups=np.repeat(np.zeros(10, np.int64) if groups is None else groups, 5),
        identity_names=[str(i) for i in range(10)],
        group_names=[f"g{g}" for g in range(10)],
        splits=splits,
        spec=spec,
        seed=3,
    )


# ------------------------------------------------------------------------- train batches


def test_pk_batch_composition(folder_dataset):
    ds = folder_dataset
    p, k = ds.spec.identities_per_batch, ds.spec.images_per_identity
    train_ids = set(ds.labels[ds.splits["train"]].tolist())
    for batch in _take(ds.train_batches(0), 3):
        assert batch["image"].shape == (p * k, 16, 16, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        labels = batch["label"].reshape(p, k)
        assert (labels == labels[:, :1]).all(), "rows must be identity-major, K per identity"
        assert len(set(labels[:, 0].tolist())) == p
        assert set(labels[:, 0].tolist()) <= train_ids


def test_a_batch_is_the_sampled_rows_each_augmented_by_its_own_generator():
    """Reference: pk_batch_indices, then row r augmented alone with default_rng((seed, s, r, 1))."""
    ds = _in_memory(augment=("random_crop", "flip", "color"))
    step = 11
    batch = _take(ds.train_batches(step), 1)[0]
    idx = sampling.pk_batch_indices(ds._by_identity, p=4, k=3, seed=3, step=step)
    for r, i in enumerate(idx):
        rng = np.random.default_rng([3, step, r, 1])
        want = preprocessing.augment_batch(
            ds.source[i : i + 1], [rng], ds.spec.augment, crop_padding=2
        )[0]
        np.testing.assert_array_equal(batch["image"][r], want)
        assert batch["label"][r] == ds.labels[i]
    assert set(batch["label"].tolist()) <= set(range(8)), "held-out identities never train"


@pytest.mark.parametrize("turns", [2, 4])
def test_rotation_classes_sample_turned_records_as_new_identities(turns):
    """Reference: every row is some training record of identity label // R turned by
    (label % R) * 360 / R degrees, K rows per sampled class; all R turns of an identity occur."""
    ds = _in_memory(augment=(), rotation_classes=turns)
    seen = set()
    for step, batch in enumerate(_take(ds.train_batches(0), 20)):
        labels = batch["label"].reshape(4, 3)
        assert (labels == labels[:, :1]).all() and len(set(labels[:, 0].tolist())) == 4
        for image, label in zip(batch["image"], batch["label"], strict=True):
            base, turn = divmod(int(label), turns)
            assert base < 8, f"step {step}: held-out identity {base} trains"
            candidates = [np.rot90(ds.source[i], turn * 4 // turns) for i in range(40)]
            candidates = [i for i, x in enumerate(candidates) if np.array_equal(x, image)]
            assert candidates and all(ds.labels[i] == base for i in candidates)
            seen.add((base, turn))
    assert {t for _, t in seen} == set(range(turns))
    classes = objective.dataset_classes(ds)
    np.testing.assert_array_equal(classes, np.arange(8 * turns))
    assert (objective.to_class_labels(batch["label"], classes) == batch["label"]).all()


@pytest.mark.parametrize("turns", [1, 4])
def test_group_batches_take_each_identity_group_from_its_records(turns):
    """Groups come from the records (identity i in group i % 2 here), turned identities keep
    theirs: with G = 1 every row of a batch is of one group; with G = 2 half and half."""
    parity = np.arange(10) % 2
    ds = _in_memory(parity, augment=(), rotation_classes=turns, groups_per_batch=1)
    ds.splits["test"] = np.arange(40, 50)  # Two held-out identities: evaluable.
    ds.check_feasible("test")
    both = set()
    for batch in _take(ds.train_batches(0), 10):
        group = (batch["label"] // turns) % 2
        assert len(set(group.tolist())) == 1
        both.add(int(group[0]))
    assert both == {0, 1}
    ds2 = _in_memory(parity, augment=(), rotation_classes=turns, groups_per_batch=2)
    for batch in _take(ds2.train_batches(0), 5):
        group = ((batch["label"] // turns) % 2).reshape(2, -1)
        assert sorted(group[:, 0].tolist()) == [0, 1] and (group == group[:, :1]).all()


def test_too_few_groups_fail_the_feasibility_check():
    """8 training identities in one group: P = 4 from G = 2 groups cannot be drawn; the error
    names the groups."""
    ds = _in_memory(groups_per_batch=2)
    ds.splits["test"] = np.arange(40, 50)  # Two held-out identities: evaluable.
    with pytest.raises(ValueError, match=r"groups_per_batch \(G\) = 2 .*\(per group: g0: 8\)"):
        ds.check_feasible("test")


def test_batches_are_deterministic_and_resume_equivalent(folder_dataset):
    run = _take(folder_dataset.train_batches(0), 5)
    again = _take(folder_dataset.train_batches(0), 5)
    resumed = _take(folder_dataset.train_batches(3), 2)
    for a, b in zip(run, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(run[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_reassemble_the_global_batch(folder_dataset, process_count):
    ds = folder_dataset
    whole = _take(ds.train_batches(7), 2)
    parts = [_take(ds.train_batches(7, i, process_count), 2) for i in range(process_count)]
    for step in range(2):
        for key in ("image", "label"):  # Augmented images too: rows do not depend on processes.
            joined = np.concatenate([p[step][key] for p in parts])
            np.testing.assert_array_equal(joined, whole[step][key])
    with pytest.raises(ValueError, match="not divisible"):
        ds.train_batches(0, 0, 5)


def test_too_few_identities_fail_when_the_iterator_is_built():
    with pytest.raises(ValueError, match="identities_per_batch"):
        _in_memory(identities_per_batch=9).train_batches(0)
    with pytest.raises(ValueError, match="unknown split"):
        records.RecordDataset(
            np.zeros((2, 6, 6, 1)),
            lambda x: x,
            labels=np.zeros(2),
            groups=np.zeros(2),
            identity_names=["a"],
            group_names=["all"],
            splits={"test": np.arange(2)},
            spec=_in_memory().spec,
            seed=0,
        )


def test_grain_worker_processes_give_the_same_batches(tree):
    root, _, _, data_dir = tree
    ds0 = input_pipeline.create_dataset(trees.folder_config(root, data_dir))
    ds1 = input_pipeline.create_dataset(trees.folder_config(root, data_dir, num_workers=1))
    for a, b in zip(_take(ds0.train_batches(2), 3), _take(ds1.train_batches(2), 3), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


# -------------------------------------------------------------------------- eval batches


@pytest.mark.parametrize("batch_size", [1, 4, 7, 100])
def test_eval_visits_every_image_once_with_ignore_padding(folder_dataset, batch_size):
    ds = folder_dataset
    for split in SPLITS:
        idx = ds.splits[split]
        batches = list(ds.eval_batches(split, batch_size))
        assert len(batches) == -(-len(idx) // batch_size)
        labels = np.concatenate([b["label"] for b in batches])
        groups = np.concatenate([b["group"] for b in batches])
        valid = labels != sampling.IGNORE_LABEL
        assert all(b["image"].shape == (batch_size, 16, 16, 3) for b in batches)
        assert valid.sum() == len(idx) and valid[: len(idx)].all()
        np.testing.assert_array_equal(labels[valid], ds.labels[idx])
        np.testing.assert_array_equal(groups[valid], ds.groups[idx])
        assert (groups[~valid] == -1).all()


def test_eval_images_are_the_unaugmented_records():
    ds = _in_memory(augment=("random_crop", "flip", "color"))
    images = np.concatenate([b["image"] for b in ds.eval_batches("val", 4)])
    np.testing.assert_array_equal(images[:5], ds.source[40:45])
    assert len(list(ds.eval_batches("val", 5))) == 1
