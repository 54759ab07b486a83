import numpy as np
import pytest

from configs import default
from facenet_jax import input_pipeline, sampling


@pytest.fixture(scope="module")
def digits():
    cfg = default.get_config()
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
    cfg.data.train_classes = tuple(range(10))
    with pytest.raises(ValueError, match="train_classes"):
        input_pipeline.create_dataset(cfg)
