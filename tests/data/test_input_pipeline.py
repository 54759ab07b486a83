import numpy as np
import pytest

from configs import default
from facenet_jax.data import input_pipeline, sampling


@pytest.fixture(scope="module")
def digits():
    cfg = default.get_config()
    cfg.data.source = "digits"
    cfg.data.image_size = 16
    return input_pipeline.create_dataset(cfg), cfg


def test_digits_splits_hold_disjoint_classes(digits):
    ds, cfg = digits
    train_labels = set(ds.splits["train"].labels.tolist())
    test_labels = set(ds.splits["test"].labels.tolist())
    assert train_labels == set(cfg.data.train_classes)
    assert test_labels == set(range(10)) - train_labels
    assert ds.split_info("train")["num_images"] + ds.split_info("test")["num_images"] == 1797
    assert ds.image_shape == (16, 16, 1)
    img = ds.splits["train"].images
    assert img.min() >= -1 and img.max() <= 1 and img.dtype == np.float32


def test_train_batches_are_pk_and_resume_equivalent(digits):
    ds, cfg = digits
    p, k = cfg.data.identities_per_batch, cfg.data.images_per_identity
    it = ds.train_batches(0)
    batches = [next(it) for _ in range(4)]
    for b in batches:
        assert b["image"].shape == (p * k, 16, 16, 1)
        labels = b["label"].reshape(p, k)
        assert np.all(labels == labels[:, :1])  # identity-major rows
        assert len(np.unique(labels[:, 0])) == p
    resumed = next(ds.train_batches(2))
    np.testing.assert_array_equal(resumed["image"], batches[2]["image"])
    np.testing.assert_array_equal(resumed["label"], batches[2]["label"])


def test_process_shards_reassemble_the_global_batch(digits):
    ds, _ = digits
    full = next(ds.train_batches(5))
    parts = [next(ds.train_batches(5, i, 2)) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), full["label"])
    # Augmented images too: a batch does not depend on how many processes load it.
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), full["image"])


def test_eval_batches_visit_every_image_once_with_ignore_padding(digits):
    ds, _ = digits
    n = ds.split_info("test")["num_images"]
    labels = np.concatenate([b["label"] for b in ds.eval_batches("test", 100)])
    assert len(labels) == -(-n // 100) * 100
    assert np.sum(labels != sampling.IGNORE_LABEL) == n
    np.testing.assert_array_equal(labels[:n], ds.splits["test"].labels)
    assert np.all(labels[n:] == sampling.IGNORE_LABEL)


def test_unknown_source_and_bad_classes_fail_with_field_name():
    cfg = default.get_config()
    cfg.data.source = "imagenet"
    with pytest.raises(ValueError, match="config.data.source"):
        input_pipeline.create_dataset(cfg)
    cfg = default.get_config()
    cfg.data.source = "digits"
    cfg.data.train_classes = tuple(range(10))
    with pytest.raises(ValueError, match="train_classes"):
        input_pipeline.create_dataset(cfg)


@pytest.fixture(scope="module")
def digit_pairs():
    cfg = default.get_config()  # source digit_pairs, the default
    return input_pipeline.create_dataset(cfg), cfg


def test_digit_pairs_hold_out_unseen_numbers_written_with_unseen_images():
    from sklearn.datasets import load_digits

    target = load_digits().target
    plan = input_pipeline.digit_pair_plan(target, seed=0, num_val=10, num_test=10, per_number=5)
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
    again = input_pipeline.digit_pair_plan(target, seed=0, num_val=10, num_test=10, per_number=5)
    np.testing.assert_array_equal(again["test"][1], plan["test"][1])


def test_digit_pairs_dataset_shapes_and_labels(digit_pairs):
    ds, cfg = digit_pairs
    n = cfg.data.digit_pair_images
    assert ds.split_info("train") | {"identity_names": None} == {
        "num_images": 80 * n,
        "num_identities": 80,
        "identity_names": None,
        "group_names": ["all"],
    }
    assert ds.split_info("test")["num_identities"] == 10
    assert ds.image_shape == (cfg.data.image_size, cfg.data.image_size, 1)
    img = ds.splits["test"].images
    assert img.min() >= -1 and img.max() <= 1 and img.dtype == np.float32
    batch = next(ds.train_batches(0))
    labels = batch["label"].reshape(cfg.data.identities_per_batch, -1)
    assert np.all(labels == labels[:, :1])
    assert set(labels[:, 0].tolist()) <= set(ds.splits["train"].labels.tolist())


def test_digit_pairs_bad_fields_fail_with_field_name():
    cfg = default.get_config()
    cfg.data.digit_pair_images = 1
    with pytest.raises(ValueError, match="config.data.digit_pair_images"):
        input_pipeline.create_dataset(cfg)
    cfg = default.get_config()
    cfg.data.test_fraction = 0.0
    with pytest.raises(ValueError, match="test_fraction"):
        input_pipeline.create_dataset(cfg)
