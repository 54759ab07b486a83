"""The folder source: preparation once, bad files, stored features, face boxes, the dataset."""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

from facenet_jax.data import (
    face_detection,
    files,
    folder,
    input_pipeline,
    preprocessing,
    sampling,
)
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


def _prepare_within(seconds, **kw):
    """folder.prepare(**kw) in a daemon thread: its builder, its exception, or "hung"."""
    out = []

    def run():
        try:
            out.append(folder.prepare(**kw))
        except Exception as e:
            out.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return out[0] if out else "hung"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_pipes_bad_names_links_and_empty_folders_prepare(tmp_path, caplog):
    root, elsewhere = tmp_path / "faces", tmp_path / "elsewhere"
    good = trees.make_tree(str(root), groups=1, ids_per_group=3, images=2)
    os.mkfifo(root / "g0" / "id00" / "pipe.jpg")  # Hung preparation forever.
    bad_name = os.path.join(str(root), "g0", "id01", os.fsdecode(b"caf\xe9.png"))
    try:
        with open(bad_name, "wb") as f:  # Stopped preparation with a UnicodeEncodeError.
            f.write(trees.encode(np.zeros((8, 8), np.uint8), "PNG"))
    except (OSError, UnicodeError):
        bad_name = None
    os.makedirs(elsewhere / "carol")  # A linked identity: "no image files found" before.
    for n in range(2):
        (elsewhere / "carol" / f"{n}.png").write_bytes(
            trees.encode(np.full((8, 8), 9 * n, np.uint8), "PNG")
        )
    os.symlink(elsewhere / "carol", root / "g0" / "carol")
    os.makedirs(root / "g0" / "nobody")
    data_dir = tmp_path / "tfds"
    with caplog.at_level(logging.WARNING):
        builder = _prepare_within(120, root=str(root), group_depth=1, data_dir=str(data_dir))
    assert not isinstance(builder, (str, Exception)), builder
    meta = builder.info.metadata
    skipped = dict(meta["skipped"])
    assert skipped["g0/id00/pipe.jpg"] == "not a regular file (a named pipe)"
    if bad_name is not None:
        assert "not valid UTF-8" in skipped["g0/id01/caf\\xe9.png"]
    assert meta["empty_identities"] == ["g0/nobody"]
    assert len(meta["labels"]) == len(good) + 2
    assert "g0/carol" in meta["identity_names"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("pipe.jpg: not a regular file" in m for m in messages)
    assert any("1 identity folders hold no file: g0/nobody" in m for m in messages)
    assert not glob.glob(str(data_dir / "face_folder" / "*" / "incomplete.*"))


def test_a_killed_preparation_leaves_nothing_behind(tmp_path):
    """What a preparation killed midway left (tfds's incomplete.* directory) is removed by the
    next one, which holds the preparation lock, so no live preparation can be writing it."""
    root, data_dir = str(tmp_path / "faces"), str(tmp_path / "tfds")
    trees.make_tree(root, groups=1, ids_per_group=2, images=2)
    name = folder.config_name(files.scan_tree(root, 1), "")
    stale = os.path.join(data_dir, "face_folder", name, "incomplete.ABC123_1.0.0")
    os.makedirs(stale)
    with open(os.path.join(stale, "face_folder-full.array_record-00000-of-00001"), "wb") as f:
        f.write(b"half written")
    builder = folder.prepare(root, group_depth=1, data_dir=data_dir)
    assert not os.path.exists(stale)
    assert len(builder.info.metadata["labels"]) == 4
    assert sorted(os.listdir(os.path.dirname(stale))) == [".prepare.lock", "1.0.0"]
    # An exception inside preparation (no decodable file) leaves no directory either.
    junk = tmp_path / "junk" / "someone"
    os.makedirs(junk)
    (junk / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="none of the 1 files"):
        folder.prepare(str(tmp_path / "junk"), data_dir=data_dir)
    assert not glob.glob(os.path.join(data_dir, "face_folder", "*", "incomplete.*"))


def test_infeasible_splits_fail_before_preparation(tmp_path, monkeypatch):
    root = str(tmp_path / "faces")
    trees.make_tree(root, groups=1, ids_per_group=3, images=3)

    def fail(*args, **kwargs):
        raise AssertionError("prepared although the split cannot work")

    monkeypatch.setattr(folder, "prepare", fail)
    spec = DataSpec.from_config(trees.folder_config(root, str(tmp_path)).data)
    small = dataclasses.replace(spec, identities_per_batch=2, val_fraction=0.1, test_fraction=0.1)
    with pytest.raises(ValueError, match=r"config.eval.split = 'test'.*holds 0 identities"):
        folder.check_feasible(small, "test")
    with pytest.raises(ValueError, match=r"config.data.identities_per_batch \(P\) = 4"):
        folder.check_feasible(spec, "test")
    photo = os.path.join(root, "g0", "id00", "0.jpg")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        folder.check_feasible(dataclasses.replace(spec, root=photo), "test")


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
