"""The folder source: preparation once, bad files, stored features, face boxes, the dataset."""

from __future__ import annotations

import logging
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from facenet_jax.data import face_detection, folder, input_pipeline, preprocessing, sampling
from facenet_jax.data.spec import DataSpec
from tests.data import trees

# ------------------------------------------------------------------ preparation and bad files


def test_prepare_skips_every_bad_file_with_a_warning(tree, tmp_path, caplog):
    root, good, bad, _ = tree
    with caplog.at_level(logging.WARNING):
        builder = folder.prepare(root, group_depth=1, data_dir=str(tmp_path))
    meta = builder.info.metadata
    skipped = dict(meta["skipped"])
    assert sorted(skipped) == sorted(bad)
    for rel, word in bad.items():
        assert word in skipped[rel], (rel, skipped[rel])
        assert any(rel in r.getMessage() for r in caplog.records), f"no warning names {rel}"
    assert meta["num_skipped"] == len(bad)
    assert any(f"{len(bad)} files skipped" in r.getMessage() for r in caplog.records)
    assert len(meta["labels"]) == len(good)


def test_records_hold_every_good_image_with_its_features(tree, tmp_path):
    import tensorflow_datasets as tfds

    root, good, _, _ = tree
    builder = folder.prepare(root, group_depth=1, data_dir=str(tmp_path))
    source = tfds.builder_from_directory(builder.data_dir).as_data_source(
        "full", decoders={"image": tfds.decode.SkipDecoding()}
    )
    names = builder.info.features["label"].names
    seen = {}
    for i in range(len(source)):
        r = source[i]
        rel = r["path"].decode()
        seen[rel] = r["identity"].decode()
        assert names[r["label"]] == seen[rel]
        assert r["group"].decode() == rel.split("/")[0]
        assert (r["face_box"] == -1).all()
        # The stored bytes decode to the same pixels as the original file.
        with open(os.path.join(root, rel), "rb") as f:
            original = preprocessing.to_mode(Image.open(f), 3)
            stored = preprocessing.to_mode(preprocessing.open_image(r["image"]), 3)
            np.testing.assert_array_equal(np.asarray(stored), np.asarray(original))
    assert seen == good


def test_prepared_once_and_again_when_the_folder_changes(tmp_path, monkeypatch):
    root = str(tmp_path / "faces")
    trees.make_tree(root, groups=1, ids_per_group=2, images=2)
    data_dir = str(tmp_path / "tfds")
    first = folder.prepare(root, group_depth=1, data_dir=data_dir)

    def fail(*args, **kwargs):
        raise AssertionError("prepared again although nothing changed")

    with monkeypatch.context() as m:
        m.setattr(folder, "_generate", fail)
        again = folder.prepare(root, group_depth=1, data_dir=data_dir)
    assert again.data_dir == first.data_dir
    with open(os.path.join(root, "g0/id00/new.png"), "wb") as f:
        f.write(trees.encode(np.zeros((8, 8), np.uint8), "PNG"))
    changed = folder.prepare(root, group_depth=1, data_dir=data_dir)
    assert changed.data_dir != first.data_dir
    assert len(changed.info.metadata["labels"]) == len(first.info.metadata["labels"]) + 1


def test_missing_or_empty_roots_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        folder.prepare(str(tmp_path / "does-not-exist"), data_dir=str(tmp_path))
    os.makedirs(tmp_path / "empty" / "someone")
    with pytest.raises(ValueError, match="no image files found"):
        folder.prepare(str(tmp_path / "empty"), data_dir=str(tmp_path))
    os.makedirs(tmp_path / "junk" / "someone")
    (tmp_path / "junk" / "someone" / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="none of the 1 files"):
        folder.prepare(str(tmp_path / "junk"), data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="config.data.root is empty"):
        folder.prepare("", data_dir=str(tmp_path))


def test_zip_root_prepares_like_the_folder(tree, tmp_path):
    root, good, _, _ = tree
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel in good:
            zf.write(os.path.join(root, rel), f"top/{rel}")
    builder = folder.prepare(str(archive / "top"), group_depth=1, data_dir=str(tmp_path))
    assert len(builder.info.metadata["labels"]) == len(good)
    assert builder.info.metadata["num_skipped"] == 0


# ------------------------------------------------------------------------------ dataset


def test_dataset_splits_and_distractors(folder_dataset):
    ds = folder_dataset
    train, test = ds.split_info("train"), ds.split_info("test")
    total = sum(ds.split_info(s)["num_images"] for s in ("train", "val", "test"))
    assert total == len(ds.labels)
    assert ds.split_info("val")["group_names"] == ["g0", "g1"]
    distractor = ds.identity_names.index("g1/id99")
    in_eval = np.concatenate([ds.splits["val"], ds.splits["test"]])
    assert distractor in ds.labels[in_eval]
    assert distractor not in ds.labels[ds.splits["train"]]
    assert train["num_identities"] + test["num_identities"] <= len(ds.identity_names)
    assert train["skipped_files"] == 7
    with pytest.raises(ValueError, match="unknown split"):
        ds.split_info("validation")


def test_train_batches_match_the_sampler_and_the_file_decoder(tree):
    """Unaugmented batch rows equal load_image of the files the PK sampler picked."""
    import tensorflow_datasets as tfds

    root, _, _, data_dir = tree
    config = trees.folder_config(root, data_dir, augment=())
    ds = input_pipeline.create_dataset(config)
    batches = ds.train_batches(5)
    batch = next(batches)
    batches.close()
    idx = sampling.pk_batch_indices(ds._by_identity, p=4, k=3, seed=config.seed, step=5)
    builder = folder.prepare(root, group_depth=1, data_dir=data_dir)
    source = tfds.builder_from_directory(builder.data_dir).as_data_source("full")
    spec = DataSpec.from_config(config.data)
    for row, i in enumerate(idx):
        path = os.path.join(root, source[int(i)]["path"].decode())
        np.testing.assert_array_equal(batch["image"][row], preprocessing.load_image(path, spec))
        assert batch["label"][row] == ds.labels[i]


def test_detect_crop_counts_center_crop_fallbacks(tree, tmp_path, monkeypatch):
    """A stand-in detector that finds a face only in bright images; misses are counted."""
    root, good, _, _ = tree

    def fake():
        def detect(image):
            if image.mean() < 100:
                return None
            return (2.0, 3.0, image.shape[0] - 2.0, image.shape[1] - 3.0)

        return detect

    monkeypatch.setitem(face_detection.DETECTORS, "fake", fake)
    face_detection.get_detector.cache_clear()
    expected_misses = 0
    for rel in good:
        rgb = np.asarray(preprocessing.to_mode(Image.open(os.path.join(root, rel)), 3))
        expected_misses += rgb.mean() < 100
    assert 0 < expected_misses < len(good)
    config = trees.folder_config(root, str(tmp_path), crop="detect", augment=(), detector="fake")
    ds = input_pipeline.create_dataset(config)
    assert ds.split_info("test")["crop_fallbacks"] == expected_misses
    batch = next(iter(ds.eval_batches("train", 64)))
    assert batch["image"].shape[1:] == (16, 16, 3)
    # A new photo through load_image meets the same detector and the same crop as its record.
    spec = DataSpec.from_config(config.data)
    first = sorted(good)[0]
    with open(os.path.join(root, first), "rb") as f:
        stored, box = preprocessing.canonical_face(f.read(), "fake")
    np.testing.assert_array_equal(
        preprocessing.load_image(os.path.join(root, first), spec),
        preprocessing.preprocess_image(stored, spec, box),
    )
    face_detection.get_detector.cache_clear()


@pytest.mark.parametrize("process_index", [0, 1])
def test_prepare_once_prepares_on_process_0_before_the_others(monkeypatch, process_index):
    import jax
    from jax.experimental import multihost_utils

    events = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: process_index)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: events.append("sync"))

    def prepare():
        events.append("prepare")
        return "builder"

    assert folder.prepare_once(prepare) == "builder"
    # Process 0 prepares, then waits; the others wait for it, then (find it prepared and) read.
    assert events == (["prepare", "sync"] if process_index == 0 else ["sync", "prepare"])
