"""create_dataset: sources looked up by name, every source the same FaceDataset interface."""

from __future__ import annotations

import numpy as np
import pytest

from configs import default
from facenet_jax.data import input_pipeline, sampling
from tests.data import trees


def test_unknown_source_fails_listing_the_valid_ones():
    cfg = default.get_config()
    cfg.data.source = "imagenet"
    with pytest.raises(ValueError, match="config.data.source.*digit_pairs"):
        input_pipeline.create_dataset(cfg)


def test_bad_config_fields_fail_before_any_data_is_read():
    cfg = default.get_config()
    cfg.data.augment = ("flip", "rotate")
    with pytest.raises(ValueError, match="config.data.augment"):
        input_pipeline.create_dataset(cfg)


@pytest.mark.parametrize("source", ["digits", "digit_pairs", "folder"])
def test_every_source_serves_the_same_interface(source, tree):
    root, _, _, data_dir = tree
    if source == "folder":
        cfg = trees.folder_config(root, data_dir)
    else:
        cfg = default.get_config()
        cfg.data.source = source
        cfg.data.augment = ("random_crop", "flip", "color")
    ds = input_pipeline.create_dataset(cfg)
    d = cfg.data
    batches = ds.train_batches(4, 1, 2)  # Process 1 of 2: the second half of the global batch.
    batch = next(batches)
    batches.close()
    half = d.identities_per_batch * d.images_per_identity // 2
    assert batch["image"].shape == (half, *ds.image_shape)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    assert -1 <= batch["image"].min() and batch["image"].max() <= 1
    info = ds.split_info("test")
    ev = next(iter(ds.eval_batches("test", 8)))
    assert set(ev) == {"image", "label", "group"} and ev["image"].shape == (8, *ds.image_shape)
    assert info["num_images"] > 0 and info["num_identities"] >= 2
    assert (ev["label"] != sampling.IGNORE_LABEL).all()
