"""Image preprocessing: decoding, cropping, scaling and training-time augmentation.

NumPy, Pillow and OpenCV; runs in the input workers. Images reaching the model are float32
[H, W, C] in [-1, 1]. Every function takes the run's ``DataSpec`` (``spec.py``). Every path
(training and evaluation records, ``load_image`` / ``load_image_bytes`` for new photos) goes
through ``preprocess_image``, so a face is seen the same way at training and at inference:

  bytes -> decode (JPEG at a reduced DCT scale when the crop is much larger than the input)
        -> grey ("L", ITU-R 601 luma) or RGB per ``channels``
        -> crop box: none = whole image | center = central square of side
           ``center_crop_fraction * min(H, W)`` | detect = square around the face box, enlarged by
           ``detect_margin``, center crop when no face was found
        -> bilinear (antialiased) resize of the box to ``image_size x image_size``
           (align instead: the similarity warp of the face's 5 landmarks onto the ArcFace
           template, ``alignment.py``; landmarks cached per content; center crop when no face)
        -> x / 255 * 2 - 1.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

from facenet_jax.data import alignment, face_detection
from facenet_jax.data.spec import DataSpec, as_spec

# What Pillow raises on a corrupt, truncated or hostile file.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

Box = tuple[float, float, float, float]  # (y0, x0, y1, x1)


def to_unit_range(images: np.ndarray, max_value: float) -> np.ndarray:
    """Maps pixel values in [0, max_value] to float32 in [-1, 1]."""
    return (np.asarray(images, np.float32) * (2.0 / max_value) - 1.0).astype(np.float32)


def augment_batch(
    images: np.ndarray,
    rngs: Sequence[np.random.Generator],
    augment: tuple[str, ...],
    *,
    crop_padding: int = 2,
    affine_degrees: float = 10.0,
    affine_scale: float = 0.1,
) -> np.ndarray:
    """Applies the selected augmentations independently to every image of a batch.

    Image i draws its random parameters from ``rngs[i]`` alone, in this order: random_crop's
    shifts dy, dx ~ U{0..2 * crop_padding}, flip ~ Bernoulli(0.5), color's contrast ~ U(0.7, 1.3)
    then brightness ~ U(-0.2, 0.2), affine's angle ~ U(-affine_degrees, affine_degrees) then
    log zoom ~ U(-log(1 + affine_scale), log(1 + affine_scale)) (each only when enabled; a new
    augmentation draws after the older ones, so adding it leaves their draws unchanged). An
    image's augmentation therefore depends on its own generator, not on the batch or process it
    is loaded in; the reader seeds row r of step s with (seed, s, r).

    Applied in this order:

    * affine: rotate by the angle (counter-clockwise, degrees) and zoom about the image centre,
      ``x' = Z R(angle) (x - c) + c`` with c = ((W - 1) / 2, (H - 1) / 2), bilinear, edge pixels
      replicated (one ``cv2.warpAffine``); the small in-plane rotations and scale changes that
      alignment leaves and that strokes drawn by different hands have;
    * random_crop: edge-pad by ``crop_padding`` pixels, cut the [H, W] window at (dy, dx);
    * flip: mirror left-right;
    * color: ``clip((x - mean(x)) * contrast + mean(x) + brightness, -1, 1)``, per-image mean.

    Args:
      images: [B, H, W, C] float32 in [-1, 1].
      rngs: B generators, one per image.
      augment: subset of ``spec.AUGMENTATIONS``.
      crop_padding: random_crop pads each side by this many pixels (edge values) and crops back.
      affine_degrees: affine's largest rotation, degrees.
      affine_scale: affine's largest zoom: factors in [1 / (1 + s), 1 + s], log-uniform.

    Returns:
      [B, H, W, C] float32 in [-1, 1].
    """
    out = np.array(images, dtype=np.float32, copy=True)
    b, h, w, _ = out.shape
    if len(rngs) != b:
        raise ValueError(f"augment_batch: {len(rngs)} generators for {b} images")
    crop = "random_crop" in augment and crop_padding > 0
    shift, flip = np.zeros((b, 2), np.int64), np.zeros(b, bool)
    scale = np.ones((b, 2), np.float32)  # (contrast, brightness) per image
    warp = np.zeros((b, 2))  # (angle in degrees, log zoom) per image
    log_zoom = np.log1p(affine_scale)
    for i, rng in enumerate(rngs):
        if crop:
            shift[i] = rng.integers(0, 2 * crop_padding + 1), rng.integers(0, 2 * crop_padding + 1)
        if "flip" in augment:
            flip[i] = rng.random() < 0.5
        if "color" in augment:
            scale[i] = rng.uniform(0.7, 1.3), rng.uniform(-0.2, 0.2)
        if "affine" in augment:
            warp[i] = rng.uniform(-affine_degrees, affine_degrees), rng.uniform(-log_zoom, log_zoom)
    if "affine" in augment:
        out = _affine(out, warp)
    if crop:
        pad = crop_padding
        padded = np.pad(out, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
        for i, (dy, dx) in enumerate(shift):
            out[i] = padded[i, dy : dy + h, dx : dx + w]
    if flip.any():
        out[flip] = out[flip, :, ::-1]
    if "color" in augment:
        contrast, brightness = scale[:, 0, None, None, None], scale[:, 1, None, None, None]
        mean = out.mean(axis=(1, 2, 3), keepdims=True)
        out = np.clip((out - mean) * contrast + mean + brightness, -1.0, 1.0)
    return out


def _affine(images: np.ndarray, warp: np.ndarray) -> np.ndarray:
    """[B, H, W, C] images, each rotated by warp[i, 0] degrees and zoomed by exp(warp[i, 1])
    about its centre ((W - 1) / 2, (H - 1) / 2); bilinear, edges replicated."""
    import cv2

    _, h, w, c = images.shape
    centre = ((w - 1) / 2.0, (h - 1) / 2.0)
    out = np.empty_like(images)
    for i, (angle, log_zoom) in enumerate(warp):
        matrix = cv2.getRotationMatrix2D(centre, float(angle), float(np.exp(log_zoom)))
        warped = cv2.warpAffine(
            images[i], matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        out[i] = warped.reshape(h, w, c)
    return out


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Converts a Pillow image to "L" (channels=1) or "RGB" (channels=3).

    16/32-bit grey (PGM with maxval > 255, mode I or I;16) is rescaled to 8 bits rather than
    clipped; palette, alpha, CMYK and 1-bit images go through Pillow's standard conversions.
    """
    if channels not in (1, 3):
        raise ValueError(f"config.data.channels must be 1 (grey) or 3 (RGB), got {channels}")
    if image.mode.startswith("I") or image.mode == "F":
        arr = np.asarray(image, np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def open_image(data: bytes) -> Image.Image:
    """Opens encoded image bytes with Pillow (lazy: only the header is read)."""
    image = Image.open(io.BytesIO(data))
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # Animated GIF: the first frame.
    return image


def canonical_encoding(data: bytes) -> tuple[bytes, Image.Image]:
    """Checks that bytes hold an image and returns them in a form ``decode`` reads identically.

    JPEG and PNG in L or RGB mode come back unchanged; anything else Pillow decodes (PGM, GIF,
    BMP, TIFF, 16-bit grey, palette, alpha, CMYK, ...) is re-encoded losslessly as PNG in L (grey
    sources) or RGB. The whole image is decoded, so truncated and corrupt files fail here.

    Returns:
      (encoded bytes, the decoded Pillow image in L or RGB mode).

    Raises:
      ValueError naming what is wrong (empty, not an image, truncated, ...).
    """
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        image = open_image(data)
        fmt, mode, frames = image.format, image.mode, getattr(image, "n_frames", 1)
        image.load()
        grey = mode in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
        image = to_mode(image, 1 if grey else 3)
    except DECODE_ERRORS as e:
        raise ValueError(f"not a decodable image ({type(e).__name__}: {e})") from e
    if fmt in ("JPEG", "PNG") and mode in ("L", "RGB") and frames == 1:
        return data, image
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), image


def decode(data: bytes, channels: int, reduce: int = 1) -> np.ndarray:
    """Decodes JPEG/PNG bytes (OpenCV, ~2x faster than Pillow) to [h, w, channels] uint8.

    ``reduce`` in {1, 2, 4, 8} decodes a JPEG at 1/reduce scale (libjpeg DCT scaling). EXIF
    orientation is ignored, as Pillow (which found the face boxes) ignores it. Formats OpenCV
    cannot read fall back to Pillow.
    """
    import cv2

    if channels not in (1, 3):
        raise ValueError(f"config.data.channels must be 1 (grey) or 3 (RGB), got {channels}")
    flag = {
        (1, 1): cv2.IMREAD_GRAYSCALE,
        (1, 2): cv2.IMREAD_REDUCED_GRAYSCALE_2,
        (1, 4): cv2.IMREAD_REDUCED_GRAYSCALE_4,
        (1, 8): cv2.IMREAD_REDUCED_GRAYSCALE_8,
        (3, 1): cv2.IMREAD_COLOR,
        (3, 2): cv2.IMREAD_REDUCED_COLOR_2,
        (3, 4): cv2.IMREAD_REDUCED_COLOR_4,
        (3, 8): cv2.IMREAD_REDUCED_COLOR_8,
    }[(channels, reduce)]
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if arr is None:
        arr = np.asarray(to_mode(open_image(data), channels))
    elif channels == 3:
        arr = arr[..., ::-1]  # BGR -> RGB
    return arr.reshape(arr.shape[0], arr.shape[1], channels)


def crop_box(
    height: int, width: int, spec: DataSpec, face_box: Sequence[float] | None = None
) -> tuple[Box, bool]:
    """The crop of a ``height x width`` image per ``spec.crop``: (y0, x0, y1, x1) pixels.

    none = the whole image; center = the central square of side
    ``center_crop_fraction * min(H, W)``; detect = the square of side
    ``max(h, w) * (1 + detect_margin)`` around the face box, the center crop when there is none.
    ``face_box`` is the detector's box as fractions of the image (see
    ``face_detection.detect_relative``), or None / negative entries when no face was found. Returns
    ``(box, fallback)`` where ``fallback`` is True when crop=detect fell back to the center crop.
    crop=align uses no box: this is its center-crop fallback for images without a face.
    """
    spec = as_spec(spec)
    if spec.crop == "none":
        return (0.0, 0.0, float(height), float(width)), False
    if spec.crop == "detect" and face_box is not None and min(face_box) >= 0:
        y0, x0, y1, x1 = (float(v) for v in face_box)
        box = (y0 * height, x0 * width, y1 * height, x1 * width)
        return face_detection.face_crop_box(box, height, width, spec.detect_margin), False
    center = face_detection.center_crop_box(height, width, spec.center_crop_fraction)
    return center, spec.crop in ("detect", "align")


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of JPEG bytes from the header, None for other formats."""
    if data[:2] != b"\xff\xd8":
        return None
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except DECODE_ERRORS:
        return None
    return height, width


def preprocess_image(
    data: bytes, spec: DataSpec, face_box: Sequence[float] | None = None
) -> np.ndarray:
    """Decodes, crops and resizes one encoded image (no augmentation).

    The crop box (see ``crop_box``) is cut from the decoded image, rounded to whole pixels, and
    resized to image_size x image_size (area averaging when shrinking, bilinear when enlarging).
    Large JPEGs are decoded at the smallest 1/2^n scale that keeps the crop >= image_size pixels.

    Args:
      data: encoded image bytes (JPEG or PNG; other formats go through Pillow).
      spec: the run's data spec (channels, image_size, crop, center_crop_fraction,
        detect_margin); ``config.data`` is converted.
      face_box: crop=detect only: [4] face box as fractions of the image, None or -1 if no face.

    Returns:
      [image_size, image_size, channels] float32 in [-1, 1].
    """
    import cv2

    spec = as_spec(spec)
    size, channels = spec.image_size, spec.channels
    reduce = 1
    hw = _jpeg_size(data)
    if spec.crop == "align":
        landmarks = face_landmarks(data, spec, hw)
        if landmarks is not None:
            return aligned_image(data, spec, landmarks, hw)
    if hw is not None:
        (y0, x0, y1, x1), _ = crop_box(hw[0], hw[1], spec, face_box)
        side = min(y1 - y0, x1 - x0)
        while reduce < 8 and side / (2 * reduce) >= size:
            reduce *= 2
    arr = decode(data, channels, reduce)
    height, width = arr.shape[:2]
    (y0, x0, y1, x1), _ = crop_box(height, width, spec, face_box)
    top, left = int(round(y0)), int(round(x0))
    bottom, right = max(top + 1, int(round(y1))), max(left + 1, int(round(x1)))
    crop = arr[top:bottom, left:right]
    shrink = crop.shape[0] > size or crop.shape[1] > size
    out = cv2.resize(
        np.ascontiguousarray(crop),
        (size, size),
        interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
    )
    return to_unit_range(out.reshape(size, size, channels), 255.0)


DETECT_SIDE = 640  # crop=align: large JPEGs are searched for landmarks at >= this long side.


def face_landmarks(
    data: bytes, spec: DataSpec, hw: tuple[int, int] | None = None
) -> np.ndarray | None:
    """crop=align: the 5 landmarks [5, 2] of the face in encoded ``data``, None when no face.

    Fractions of the image (``alignment.to_relative``) from the detector ``spec.detector``, read
    from the landmark cache (``alignment.cached_landmarks``, keyed by the bytes' SHA-1) or found on
    the RGB decode (large JPEGs at the 1/2^n DCT scale that keeps the long side >= DETECT_SIDE).
    ``hw``: the JPEG's (height, width) when the caller has it.
    """
    hw = _jpeg_size(data) if hw is None else hw
    reduce = 1
    while hw is not None and reduce < 8 and max(hw) / (2 * reduce) >= DETECT_SIDE:
        reduce *= 2
    return alignment.cached_landmarks(data, lambda: decode(data, 3, reduce), spec.detector)


def aligned_image(
    data: bytes, spec: DataSpec, landmarks: np.ndarray, hw: tuple[int, int] | None = None
) -> np.ndarray:
    """crop=align: ``alignment.align`` of the decoded ``data`` -> [S, S, C] float32 in [-1, 1].

    A JPEG is decoded at the smallest 1/2^n scale at which the warp still shrinks the face
    (scale s * 2^n <= 1), as the crop path keeps the crop >= image_size pixels.
    """
    size, reduce = spec.image_size, 1
    if hw is not None:
        full = alignment.similarity_transform(
            alignment.to_pixels(landmarks, *hw), alignment.template(size, spec.align_margin)
        )
        scale = float(np.hypot(full[0, 0], full[1, 0]))
        while reduce < 8 and scale * 2 * reduce <= 1.0:
            reduce *= 2
    arr = decode(data, spec.channels, reduce)
    points = alignment.to_pixels(landmarks, *arr.shape[:2])
    out = alignment.align(arr, points, size, spec.align_margin)
    return to_unit_range(out.reshape(size, size, spec.channels), 255.0)


def canonical_face(data: bytes, detector: str = "") -> tuple[bytes, Box | None]:
    """What preparation stores for encoded bytes: ``canonical_encoding`` plus the face box.

    Returns ``(stored bytes, face box)``: the box as fractions of the image from ``detector``
    (``face_detection.DETECTORS``, run on the decoded L or RGB image), None when ``detector`` is
    "" or finds no face. Raises ValueError when the bytes are not a usable image.
    """
    stored, image = canonical_encoding(data)
    if not detector:
        return stored, None
    return stored, face_detection.detect_relative(np.asarray(image), detector)


def load_image_bytes(data: bytes, spec: DataSpec, name: str = "<bytes>") -> np.ndarray:
    """The encoded bytes of a new photo as training saw its records (no augmentation).

    The bytes go through the same ``canonical_face`` as folder preparation (so with crop=detect
    the detector ``spec.detector`` runs here, a warning naming ``name`` when it finds no face and
    the center crop is used) and the same ``preprocess_image`` as training.

    Returns:
      [image_size, image_size, channels] float32 in [-1, 1]. Raises ValueError naming ``name``
      when the bytes are not a decodable image.
    """
    spec = as_spec(spec)
    try:
        stored, face_box = canonical_face(data, spec.detector if spec.crop == "detect" else "")
    except ValueError as e:
        raise ValueError(f"image file {name}: {e}") from e
    if spec.crop == "detect" and face_box is None:
        logging.warning("crop=detect: no face found in %s; using the center crop", name)
    if spec.crop == "align" and face_landmarks(stored, spec) is None:
        logging.warning("crop=align: no face found in %s; using the center crop", name)
    return preprocess_image(stored, spec, face_box)


def load_image(path: str, spec: DataSpec) -> np.ndarray:
    """Loads an image file exactly as training and evaluation see it (``load_image_bytes``).

    Returns:
      [image_size, image_size, channels] float32 in [-1, 1]. Raises OSError (unreadable) or
      ValueError (not a decodable image) naming the file.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise OSError(f"cannot read image file {path}: {e}") from e
    return load_image_bytes(data, spec, path)
