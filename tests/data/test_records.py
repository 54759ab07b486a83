"""Folder and catalog datasets: preparation, bad files, splits, PK batches, sharding, padding."""

from __future__ import annotations

import io
import logging
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from configs import default
from facenet_jax.data import face_detection, folder_builder, preprocessing, records, sampling

FORMATS = ("JPEG", "PNG", "PPM", "GIF", "BMP")  # PPM/PGM: Pillow's netpbm writer.
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "PPM": ".pgm", "GIF": ".gif", "BMP": ".bmp"}


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def _face(rng: np.random.Generator, ident: int, grey: bool, h: int, w: int) -> np.ndarray:
    """A smooth image whose colour depends on the identity, plus noise; grey or RGB."""
    base = np.array([40 + 50 * (ident % 4), 200 - 30 * (ident % 5), 60 + 20 * (ident % 7)])
    img = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return img.mean(-1).astype(np.uint8) if grey else img


def make_tree(root: str, *, groups: int = 2, ids_per_group: int = 4, images: int = 4, seed=0):
    """ROOT/g<k>/id<k><j>/<n>.<ext>: every format, grey and RGB, odd sizes.

    Returns {relative path: identity name} of the good images.
    """
    rng = np.random.default_rng(seed)
    good = {}
    for g in range(groups):
        for j in range(ids_per_group):
            ident = g * ids_per_group + j
            name = f"g{g}/id{ident:02d}"
            os.makedirs(os.path.join(root, name), exist_ok=True)
            for n in range(images):
                fmt = FORMATS[(ident + n) % len(FORMATS)]
                grey = fmt == "PPM" or (n % 3 == 0 and fmt != "GIF")
                h, w = 20 + 3 * n, 18 + 2 * ident
                img = _face(rng, ident, grey, h, w)
                if fmt == "GIF":
                    img = img if img.ndim == 2 else img[..., 0]
                rel = f"{name}/{n}{SUFFIX[fmt]}"
                with open(os.path.join(root, rel), "wb") as f:
                    f.write(_encode(img, fmt))
                good[rel] = name
    return good


def add_bad_files(root: str) -> dict[str, str]:
    """Every bad-file case; returns {relative path: word expected in the skip reason}."""
    jpeg = _encode(np.full((32, 32, 3), 128, np.uint8), "JPEG")
    bad = {
        "g0/id00/corrupt.jpg": (b"\xff\xd8\xff\xe0" + os.urandom(200), "decodable"),
        "g0/id00/truncated.jpg": (jpeg[: len(jpeg) // 2], "decodable"),
        "g0/id01/empty.png": (b"", "empty"),
        "g0/id01/notes.txt": (b"not an image at all\n", "decodable"),
        "README": (b"a file outside the identity folders", "not at ROOT"),
    }
    for rel, (data, _) in bad.items():
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    os.symlink(os.path.join(root, "missing-target.jpg"), os.path.join(root, "g1/id04/dangling.jpg"))
    reasons = {rel: word for rel, (_, word) in bad.items()}
    reasons["g1/id04/dangling.jpg"] = "unreadable"
    return reasons


def folder_config(root: str, data_dir: str, **data):
    config = default.get_config()
    d = config.data
    d.source = "folder"
    d.root = root
    d.group_depth = 1
    d.data_dir = data_dir
    d.channels = 3
    d.image_size = 16
    d.identities_per_batch = 4
    d.images_per_identity = 3
    d.val_fraction = 0.25
    d.test_fraction = 0.25
    d.augment = ("random_crop", "flip", "color")
    for k, v in data.items():
        d[k] = v
    return config


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("faces"))
    good = make_tree(root)
    bad = add_bad_files(root)
    # An identity left with one good image: excluded from training, kept as a distractor.
    os.makedirs(os.path.join(root, "g1/id99"))
    with open(os.path.join(root, "g1/id99/only.png"), "wb") as f:
        f.write(_encode(_face(np.random.default_rng(9), 99, False, 20, 20), "PNG"))
    with open(os.path.join(root, "g1/id99/broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8 nope")
    bad["g1/id99/broken.jpg"] = "decodable"
    good["g1/id99/only.png"] = "g1/id99"
    return root, good, bad, str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def dataset(tree):
    root, _, _, data_dir = tree
    return records.create_dataset(folder_config(root, data_dir))


# ------------------------------------------------------------------ preparation and bad files


def test_prepare_skips_every_bad_file_with_a_warning(tree, tmp_path, caplog):
    root, good, bad, _ = tree
    with caplog.at_level(logging.WARNING):
        builder = folder_builder.prepare(root, group_depth=1, data_dir=str(tmp_path))
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
    builder = folder_builder.prepare(root, group_depth=1, data_dir=str(tmp_path))
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
    make_tree(root, groups=1, ids_per_group=2, images=2)
    data_dir = str(tmp_path / "tfds")
    first = folder_builder.prepare(root, group_depth=1, data_dir=data_dir)

    def fail(*args, **kwargs):
        raise AssertionError("prepared again although nothing changed")

    with monkeypatch.context() as m:
        m.setattr(folder_builder, "_generate", fail)
        again = folder_builder.prepare(root, group_depth=1, data_dir=data_dir)
    assert again.data_dir == first.data_dir
    with open(os.path.join(root, "g0/id00/new.png"), "wb") as f:
        f.write(_encode(np.zeros((8, 8), np.uint8), "PNG"))
    changed = folder_builder.prepare(root, group_depth=1, data_dir=data_dir)
    assert changed.data_dir != first.data_dir
    assert len(changed.info.metadata["labels"]) == len(first.info.metadata["labels"]) + 1


def test_missing_or_empty_roots_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        folder_builder.prepare(str(tmp_path / "does-not-exist"), data_dir=str(tmp_path))
    os.makedirs(tmp_path / "empty" / "someone")
    with pytest.raises(ValueError, match="no image files found"):
        folder_builder.prepare(str(tmp_path / "empty"), data_dir=str(tmp_path))
    os.makedirs(tmp_path / "junk" / "someone")
    (tmp_path / "junk" / "someone" / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="none of the 1 files"):
        folder_builder.prepare(str(tmp_path / "junk"), data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="config.data.root is empty"):
        folder_builder.prepare("", data_dir=str(tmp_path))


def test_zip_root_matches_the_folder(tree, tmp_path):
    root, good, _, _ = tree
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel in good:
            zf.write(os.path.join(root, rel), f"top/{rel}")
    listing = folder_builder.scan_tree(str(archive / "top"), group_depth=1)
    assert sorted(listing.files) == sorted(good)
    builder = folder_builder.prepare(str(archive / "top"), group_depth=1, data_dir=str(tmp_path))
    assert len(builder.info.metadata["labels"]) == len(good)
    assert builder.info.metadata["num_skipped"] == 0


def test_identity_names_include_the_group(tmp_path):
    # The same identity folder name in two groups (omniglot's character01) is two identities.
    for g in ("a", "b"):
        os.makedirs(tmp_path / g / "char01")
        (tmp_path / g / "char01" / "x.png").write_bytes(_encode(np.zeros((4, 4), np.uint8), "PNG"))
    listing = folder_builder.scan_tree(str(tmp_path), group_depth=1)
    assert listing.identity_names == ("a/char01", "b/char01")
    assert listing.group_names == ("a", "b")


# ------------------------------------------------------------------------------- splits


def _reference_partition_ok(splits, n):
    joined = np.concatenate([splits[s] for s in records.SPLITS])
    return sorted(joined.tolist()) == list(range(n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identity_split_is_disjoint_stratified_and_deterministic(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 8, size=60)
    labels = np.repeat(np.arange(60), counts)
    groups = labels % 3
    kw = dict(by="identity", val_fraction=0.2, test_fraction=0.1, seed=seed, min_images=2)
    splits = records.split_indices(labels, groups, **kw)
    assert _reference_partition_ok(splits, len(labels))
    ids = {s: set(labels[splits[s]].tolist()) for s in records.SPLITS}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]
    small = set(np.flatnonzero(counts < 2).tolist())
    assert not small & ids["train"], "identities with < 2 images must not be trained on"
    for g in range(3):
        eligible = [i for i in range(60) if i % 3 == g and counts[i] >= 2]
        held = [i for i in eligible if i in ids["val"]]
        assert len(held) == int(np.floor(0.2 * len(eligible) + 0.5))
    again = records.split_indices(labels, groups, **kw)
    for s in records.SPLITS:
        np.testing.assert_array_equal(splits[s], again[s])


def test_image_split_keeps_identities_and_two_training_images():
    counts = np.array([1, 2, 3, 10, 25])
    labels = np.repeat(np.arange(5), counts)
    splits = records.split_indices(
        labels, by="image", val_fraction=0.2, test_fraction=0.2, seed=0, min_images=2
    )
    assert _reference_partition_ok(splits, len(labels))
    for ident, n in enumerate(counts):
        in_train = int((labels[splits["train"]] == ident).sum())
        if n < 2:
            assert in_train == 0 and (labels[splits["test"]] == ident).sum() == n
        else:
            assert in_train >= 2
    assert int((labels[splits["val"]] == 4).sum()) == 5  # round(0.2 * 25)


def test_bad_split_fields_raise():
    with pytest.raises(ValueError, match="split_by"):
        records.split_indices(np.zeros(4), by="pixel")
    with pytest.raises(ValueError, match="val_fraction"):
        records.split_indices(np.zeros(4), val_fraction=0.6, test_fraction=0.5)


def test_dataset_splits_and_distractors(dataset):
    train, test = dataset.split_info("train"), dataset.split_info("test")
    total = sum(dataset.split_info(s)["num_images"] for s in records.SPLITS)
    assert total == len(dataset.labels)
    assert dataset.split_info("val")["group_names"] == ["g0", "g1"]
    distractor = dataset.identity_names.index("g1/id99")
    in_eval = np.concatenate([dataset.splits["val"], dataset.splits["test"]])
    assert distractor in dataset.labels[in_eval]
    assert train["num_identities"] + test["num_identities"] <= len(dataset.identity_names)
    assert train["skipped_files"] == 7
    with pytest.raises(ValueError, match="unknown split"):
        dataset.split_info("validation")


# ------------------------------------------------------------------------- train batches


def _take(iterator, n):
    out = [next(iterator) for _ in range(n)]
    iterator.close()
    return out


def test_pk_batch_composition(dataset):
    d = dataset.config.data
    train_ids = set(dataset.labels[dataset.splits["train"]].tolist())
    for batch in _take(dataset.train_batches(0), 3):
        assert batch["image"].shape == (12, 16, 16, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        labels = batch["label"].reshape(d.identities_per_batch, d.images_per_identity)
        assert (labels == labels[:, :1]).all(), "rows must be identity-major, K per identity"
        assert len(set(labels[:, 0].tolist())) == d.identities_per_batch
        assert set(labels[:, 0].tolist()) <= train_ids


def test_train_batches_match_the_sampler_and_the_file_decoder(tree):
    """Unaugmented batch rows equal load_image of the files the PK sampler picked."""
    import tensorflow_datasets as tfds

    root, _, _, data_dir = tree
    config = folder_config(root, data_dir, augment=())
    ds = records.create_dataset(config)
    batch = _take(ds.train_batches(5), 1)[0]
    idx = sampling.pk_batch_indices(ds._by_identity, p=4, k=3, seed=config.seed, step=5)
    builder = folder_builder.prepare(root, group_depth=1, data_dir=data_dir)
    source = tfds.builder_from_directory(builder.data_dir).as_data_source("full")
    for row, i in enumerate(idx):
        path = os.path.join(root, source[int(i)]["path"].decode())
        np.testing.assert_array_equal(
            batch["image"][row], preprocessing.load_image(path, config.data)
        )
        assert batch["label"][row] == ds.labels[i]


def test_batches_are_deterministic_and_resume_equivalent(dataset):
    run = _take(dataset.train_batches(0), 5)
    again = _take(dataset.train_batches(0), 5)
    resumed = _take(dataset.train_batches(3), 2)
    for a, b in zip(run, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(run[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_reassemble_the_global_batch(dataset, process_count):
    whole = _take(dataset.train_batches(7), 2)
    parts = [_take(dataset.train_batches(7, i, process_count), 2) for i in range(process_count)]
    for step in range(2):
        for key in ("image", "label"):
            joined = np.concatenate([p[step][key] for p in parts])
            np.testing.assert_array_equal(joined, whole[step][key])
    with pytest.raises(ValueError, match="not divisible"):
        dataset.train_batches(0, 0, 5)


def test_too_few_identities_fail_when_the_iterator_is_built(tree):
    root, _, _, data_dir = tree
    ds = records.create_dataset(folder_config(root, data_dir, identities_per_batch=50))
    with pytest.raises(ValueError, match="identities_per_batch"):
        ds.train_batches(0)


def test_grain_worker_processes_give_the_same_batches(tree):
    root, _, _, data_dir = tree
    ds0 = records.create_dataset(folder_config(root, data_dir))
    ds1 = records.create_dataset(folder_config(root, data_dir, num_workers=1))
    for a, b in zip(_take(ds0.train_batches(2), 3), _take(ds1.train_batches(2), 3), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


# -------------------------------------------------------------------------- eval batches


@pytest.mark.parametrize("batch_size", [1, 4, 7, 100])
def test_eval_visits_every_image_once_with_ignore_padding(dataset, batch_size):
    for split in records.SPLITS:
        idx = dataset.splits[split]
        batches = list(dataset.eval_batches(split, batch_size))
        assert len(batches) == -(-len(idx) // batch_size)
        labels = np.concatenate([b["label"] for b in batches])
        groups = np.concatenate([b["group"] for b in batches])
        valid = labels != sampling.IGNORE_LABEL
        assert all(b["image"].shape == (batch_size, 16, 16, 3) for b in batches)
        assert valid.sum() == len(idx) and valid[: len(idx)].all()
        np.testing.assert_array_equal(labels[valid], dataset.labels[idx])
        np.testing.assert_array_equal(groups[valid], dataset.groups[idx])
        assert (groups[~valid] == -1).all()


def test_eval_images_are_unaugmented(dataset):
    first = next(iter(dataset.eval_batches("train", 4)))["image"]
    again = next(iter(dataset.eval_batches("train", 4)))["image"]
    np.testing.assert_array_equal(first, again)


# ----------------------------------------------------------------------- detector crop


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
    config = folder_config(root, str(tmp_path), crop="detect", augment=())
    config.data.detector = "fake"
    ds = records.create_dataset(config)
    assert ds.split_info("test")["crop_fallbacks"] == expected_misses
    batch = next(iter(ds.eval_batches("train", 64)))
    assert batch["image"].shape[1:] == (16, 16, 3)
    face_detection.get_detector.cache_clear()


# --------------------------------------------------------------------- catalog datasets


def _build_catalog(data_dir: str, dataset_name: str, text_labels: bool):
    """Prepares a tiny catalog-style dataset (PNG image, label, alphabet) in ArrayRecord."""
    import tensorflow_datasets as tfds

    class Builder(tfds.core.GeneratorBasedBuilder):
        name = dataset_name
        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            label = tfds.features.Text() if text_labels else tfds.features.ClassLabel(num_classes=6)
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(12, 12, 1), encoding_format="png"),
                        "label": label,
                        "alphabet": tfds.features.ClassLabel(num_classes=2),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(0)
            for i in range(48):
                img = rng.integers(0, 255, (12, 12), dtype=np.uint8)
                label = f"person{i % 6}" if text_labels else i % 6
                yield i, {"image": _encode(img, "PNG"), "label": label, "alphabet": i % 6 // 3}

    builder = Builder(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()


@pytest.mark.parametrize("text_labels", [False, True])
def test_catalog_dataset(tmp_path, text_labels):
    name = f"tiny_catalog_{'text' if text_labels else 'class'}"
    _build_catalog(str(tmp_path), name, text_labels)
    config = folder_config("", str(tmp_path), channels=1, val_fraction=0.0, test_fraction=0.34)
    config.data.source = "tfds"
    config.data.tfds_name = name
    config.data.tfds_group_key = "alphabet"
    ds = records.create_catalog_dataset(config)
    assert len(ds.labels) == 48 and len(set(ds.labels.tolist())) == 6
    assert ds.group_names == ["0", "1"]
    if text_labels:
        assert ds.identity_names == [f"person{i}" for i in range(6)]
    assert ds.split_info("test")["num_identities"] == 2
    batch = _take(ds.train_batches(0), 1)[0]
    assert batch["image"].shape == (12, 16, 16, 1)
    eval_labels = np.concatenate([b["label"] for b in ds.eval_batches("test", 5)])
    assert (eval_labels != sampling.IGNORE_LABEL).sum() == 16


def test_catalog_errors_are_clear(tmp_path):
    config = folder_config("", str(tmp_path))
    config.data.source = "tfds"
    with pytest.raises(ValueError, match="tfds_name is empty"):
        records.create_catalog_dataset(config)
    config.data.tfds_name = "no_such_dataset_anywhere"
    with pytest.raises(ValueError, match="no_such_dataset_anywhere"):
        records.create_catalog_dataset(config)
    config.data.tfds_name = "mnist"  # In the catalog, but not prepared in this data_dir.
    with pytest.raises(FileNotFoundError, match="tfds build mnist"):
        records.create_catalog_dataset(config)
    config.data.crop = "detect"
    with pytest.raises(ValueError, match="crop='detect'"):
        records.create_catalog_dataset(config)


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

    assert records.prepare_once(prepare) == "builder"
    # Process 0 prepares, then waits; the others wait for it, then (find it prepared and) read.
    assert events == (["prepare", "sync"] if process_index == 0 else ["sync", "prepare"])
