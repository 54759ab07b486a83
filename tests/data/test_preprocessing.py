"""Preprocessing: decoding, grey/RGB, crops, resize, scaling, augmentation, load_image."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from configs import default
from facenet_jax.data import face_detection, preprocessing
from facenet_jax.data.spec import DataSpec


def _encode(image: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _cfg(**kw) -> DataSpec:
    """The default spec at 8x8 RGB, uncropped, with ``kw`` overridden."""
    spec = DataSpec.from_config(default.get_config().data)
    base = dict(image_size=8, channels=3, crop="none", center_crop_fraction=1.0)
    return dataclasses.replace(spec, **{**base, **kw})


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)


def test_to_unit_range():
    x = np.array([0, 127.5, 255])
    np.testing.assert_allclose(preprocessing.to_unit_range(x, 255.0), [-1, 0, 1])


def test_no_resize_gives_the_exact_pixels(rgb):
    """When the crop already has the input size, the output is the pixels scaled to [-1, 1]."""
    out = preprocessing.preprocess_image(_encode(rgb, "PNG"), _cfg(image_size=10, crop="center"))
    x0 = (12 - 10) // 2
    np.testing.assert_allclose(out, rgb[:, x0 : x0 + 10] / 127.5 - 1, atol=1e-6)
    assert out.dtype == np.float32 and out.shape == (10, 10, 3)


def test_center_crop_fraction_selects_the_central_square():
    img = np.zeros((40, 40), np.uint8)
    img[10:30, 10:30] = 255  # A white central square of half the side.
    out = preprocessing.preprocess_image(
        _encode(img, "PNG"),
        _cfg(image_size=20, channels=1, crop="center", center_crop_fraction=0.5),
    )
    np.testing.assert_array_equal(out, np.ones((20, 20, 1), np.float32))


def test_grey_conversion_is_luma(rgb):
    out = preprocessing.preprocess_image(
        _encode(rgb, "PNG"), _cfg(image_size=10, channels=1, crop="center")
    )
    x0 = (12 - 10) // 2
    luma = rgb[:, x0 : x0 + 10].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose((out[..., 0] + 1) * 127.5, luma, atol=1.0)


def test_grey_source_to_rgb_repeats_the_channel():
    grey = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    out = preprocessing.preprocess_image(_encode(grey, "PNG"), _cfg())
    np.testing.assert_allclose(out, np.repeat((grey / 127.5 - 1)[..., None], 3, -1), atol=1e-6)


def test_resize_averages_when_shrinking():
    # A 2x2 checkerboard of 4x4 blocks shrunk by 4: each output pixel is one block's value.
    img = np.kron(np.array([[0, 200], [100, 50]], np.uint8), np.ones((4, 4), np.uint8))
    out = preprocessing.preprocess_image(_encode(img, "PNG"), _cfg(image_size=2, channels=1))
    np.testing.assert_allclose((out[..., 0] + 1) * 127.5, [[0, 200], [100, 50]], atol=0.51)


def test_large_jpeg_reduced_decode_is_close_to_full_decode(monkeypatch):
    yy, xx = np.mgrid[0:400, 0:480]
    img = np.stack([yy * 255 // 400, xx * 255 // 480, (yy + xx) * 255 // 880], -1).astype(np.uint8)
    data = _encode(img, "JPEG", quality=95)
    calls = []
    decode = preprocessing.decode
    monkeypatch.setattr(
        preprocessing, "decode", lambda d, c, r=1: calls.append(r) or decode(d, c, r)
    )
    out = preprocessing.preprocess_image(data, _cfg(image_size=32, crop="center"))
    assert calls == [8], "a 400-pixel crop for a 32-pixel input decodes at 1/8 scale"
    full = preprocessing.decode(data, 3)[:, 40:440]  # Full-scale decode, central square.
    import cv2

    ref = cv2.resize(np.ascontiguousarray(full), (32, 32), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(out, ref / 127.5 - 1, atol=0.05)


def test_sixteen_bit_grey_is_rescaled_not_clipped():
    img16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    data, image = preprocessing.canonical_encoding(_encode(img16, "PNG"))
    assert image.mode == "L"
    np.testing.assert_allclose(np.asarray(image), img16 * (255 / 65535), atol=1)
    assert Image.open(io.BytesIO(data)).format == "PNG"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_canonical_encoding_keeps_jpeg_and_png_bytes(rgb, fmt):
    data = _encode(rgb, fmt)
    assert preprocessing.canonical_encoding(data)[0] is data


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "PPM", "TIFF"])
def test_canonical_encoding_reencodes_other_formats_losslessly(rgb, fmt):
    src = rgb[..., 0] if fmt == "GIF" else rgb
    data, image = preprocessing.canonical_encoding(_encode(src, fmt))
    assert Image.open(io.BytesIO(data)).format == "PNG"
    expected = preprocessing.to_mode(Image.open(io.BytesIO(_encode(src, fmt))), 3)
    np.testing.assert_array_equal(
        np.asarray(preprocessing.to_mode(Image.open(io.BytesIO(data)), 3)), np.asarray(expected)
    )


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty"),
        (b"hello, not an image", "decodable"),
        (b"\xff\xd8\xff\xe0garbage", "decodable"),
    ],
)
def test_canonical_encoding_rejects_bad_bytes(data, match):
    with pytest.raises(ValueError, match=match):
        preprocessing.canonical_encoding(data)


def test_truncated_jpeg_is_rejected(rgb):
    data = _encode(np.tile(rgb, (20, 20, 1)), "JPEG")
    with pytest.raises(ValueError, match="decodable"):
        preprocessing.canonical_encoding(data[: len(data) // 2])


def test_load_image_matches_the_training_path(tmp_path, rgb):
    path = tmp_path / "face.bmp"
    path.write_bytes(_encode(rgb, "BMP"))
    cfg = _cfg(image_size=6, crop="center", center_crop_fraction=0.8)
    stored, _ = preprocessing.canonical_encoding(path.read_bytes())
    np.testing.assert_array_equal(
        preprocessing.load_image(str(path), cfg), preprocessing.preprocess_image(stored, cfg)
    )


def test_load_image_accepts_config_data_as_well_as_the_spec(tmp_path, rgb):
    path = tmp_path / "face.png"
    path.write_bytes(_encode(rgb, "PNG"))
    data = default.get_config().data
    data.channels = 3
    spec = DataSpec.from_config(data)
    np.testing.assert_array_equal(
        preprocessing.load_image(str(path), data), preprocessing.load_image(str(path), spec)
    )


def test_load_image_bytes_detects_on_the_decoded_image_as_preparation_does(monkeypatch):
    """Grey bytes: the detector sees the canonical (grey, repeated to RGB) image, then the crop."""
    seen = []

    def fake():
        def detect(image):
            seen.append(image.copy())
            return (2.0, 2.0, 10.0, 10.0)

        return detect

    monkeypatch.setitem(face_detection.DETECTORS, "fake", fake)
    face_detection.get_detector.cache_clear()
    grey = np.random.default_rng(0).integers(0, 256, (16, 20), dtype=np.uint8)
    data = _encode(grey, "BMP")
    spec = _cfg(crop="detect", detector="fake", detect_margin=0.0, channels=1)
    out = preprocessing.load_image_bytes(data, spec, "x.bmp")
    stored, box = preprocessing.canonical_face(data, "fake")
    np.testing.assert_array_equal(out, preprocessing.preprocess_image(stored, spec, box))
    np.testing.assert_array_equal(seen[0], np.repeat(grey[..., None], 3, axis=-1))
    np.testing.assert_allclose(box, (2 / 16, 2 / 20, 10 / 16, 10 / 20))
    with pytest.raises(ValueError, match="x.bmp"):
        preprocessing.load_image_bytes(b"junk", spec, "x.bmp")
    face_detection.get_detector.cache_clear()


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(OSError, match="nope.jpg"):
        preprocessing.load_image(str(tmp_path / "nope.jpg"), _cfg())
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jpg.*empty"):
        preprocessing.load_image(str(tmp_path / "empty.jpg"), _cfg())


def test_crop_box_detect_and_fallback():
    cfg = _cfg(crop="detect", detect_margin=0.0, center_crop_fraction=0.5)
    box, fallback = preprocessing.crop_box(100, 200, cfg, (0.1, 0.1, 0.5, 0.3))
    assert not fallback
    np.testing.assert_allclose(box, (10, 20, 50, 60))  # Square 40x40 around the face.
    box, fallback = preprocessing.crop_box(100, 200, cfg, (-1, -1, -1, -1))
    assert fallback
    np.testing.assert_allclose(box, (25, 75, 75, 125))
    assert preprocessing.crop_box(100, 200, cfg, None)[1]
    with pytest.raises(ValueError, match="config.data.crop"):
        preprocessing.crop_box(10, 10, _cfg(crop="face"))
    assert preprocessing.crop_box(100, 200, _cfg(crop="none"), (0.1, 0.1, 0.5, 0.3)) == (
        (0.0, 0.0, 100.0, 200.0),
        False,
    )


def test_bad_channels_raise(rgb):
    with pytest.raises(ValueError, match="channels"):
        preprocessing.preprocess_image(_encode(rgb, "PNG"), _cfg(channels=2))


# -------------------------------------------------------------------------- augmentation


def _rngs(seed: int, n: int) -> list[np.random.Generator]:
    return [np.random.default_rng([seed, i]) for i in range(n)]


def test_augment_batch_is_reproducible_and_in_range():
    x = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    aug = ("random_crop", "flip", "color")
    a = preprocessing.augment_batch(x, _rngs(5, 4), aug)
    b = preprocessing.augment_batch(x, _rngs(5, 4), aug)
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape and a.dtype == np.float32
    assert a.min() >= -1 and a.max() <= 1
    with pytest.raises(ValueError, match="3 generators for 4 images"):
        preprocessing.augment_batch(x, _rngs(5, 3), aug)


def _augment_one(image, rng, augment, pad):
    """Slow obvious reference for one [H, W, C] image, draws in the documented order."""
    out = image.copy()
    h, w = image.shape[:2]
    if "random_crop" in augment and pad > 0:
        dy, dx = rng.integers(0, 2 * pad + 1), rng.integers(0, 2 * pad + 1)
        out = np.pad(out, ((pad, pad), (pad, pad), (0, 0)), mode="edge")[dy : dy + h, dx : dx + w]
    if "flip" in augment and rng.random() < 0.5:
        out = out[:, ::-1]
    if "color" in augment:
        contrast, brightness = np.float32(rng.uniform(0.7, 1.3)), np.float32(rng.uniform(-0.2, 0.2))
        mean = out.mean(keepdims=True)
        out = np.clip((out - mean) * contrast + mean + brightness, -1.0, 1.0)
    return out


@pytest.mark.parametrize(
    "augment", [("random_crop",), ("flip",), ("color",), ("random_crop", "flip", "color")]
)
def test_each_image_is_augmented_by_its_own_generator_alone(augment):
    """The batch equals the per-image reference, and does not depend on the other images."""
    x = np.random.default_rng(0).uniform(-1, 1, (6, 7, 5, 3)).astype(np.float32)
    out = preprocessing.augment_batch(x, _rngs(2, 6), augment, crop_padding=2)
    for i, rng in enumerate(_rngs(2, 6)):
        np.testing.assert_allclose(out[i], _augment_one(x[i], rng, augment, 2), atol=1e-6)
    alone = preprocessing.augment_batch(x[3:4], _rngs(2, 6)[3:4], augment, crop_padding=2)
    np.testing.assert_array_equal(alone[0], out[3])


def test_flip_only_mirrors_or_keeps_each_image():
    x = np.random.default_rng(0).uniform(-1, 1, (16, 5, 7, 1)).astype(np.float32)
    out = preprocessing.augment_batch(x, _rngs(1, 16), ("flip",))
    for o, i in zip(out, x, strict=True):
        assert np.array_equal(o, i) or np.array_equal(o, i[:, ::-1])
    assert not np.array_equal(out, x) and not np.array_equal(out, x[:, :, ::-1])


def test_random_crop_is_a_shift_of_the_padded_image():
    x = np.random.default_rng(0).uniform(-1, 1, (8, 6, 6, 1)).astype(np.float32)
    out = preprocessing.augment_batch(x, _rngs(2, 8), ("random_crop",), crop_padding=2)
    for o, i in zip(out, x, strict=True):
        padded = np.pad(i, ((2, 2), (2, 2), (0, 0)), mode="edge")
        shifts = [padded[dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
        assert any(np.array_equal(o, s) for s in shifts)


def _affine_reference(image, angle, zoom):
    """Slow obvious reference: output pixel (x', y') takes the bilinear sample of the input at
    c + R(-angle) (p' - c) / zoom (edges replicated), R counter-clockwise on the display."""
    h, w, c = image.shape
    cx, cy = (w - 1) / 2, (h - 1) / 2
    t = np.deg2rad(angle)
    out = np.empty_like(image)
    for yo in range(h):
        for xo in range(w):
            dx, dy = (xo - cx) / zoom, (yo - cy) / zoom
            # Forward map (display counter-clockwise, y down): x' = cos dx + sin dy,
            # y' = -sin dx + cos dy; its inverse:
            x = cx + np.cos(t) * dx - np.sin(t) * dy
            y = cy + np.sin(t) * dx + np.cos(t) * dy
            x, y = min(max(x, 0), w - 1), min(max(y, 0), h - 1)
            x0, y0 = min(int(x), w - 2), min(int(y), h - 2)
            fx, fy = x - x0, y - y0
            out[yo, xo] = (
                image[y0, x0] * (1 - fx) * (1 - fy)
                + image[y0, x0 + 1] * fx * (1 - fy)
                + image[y0 + 1, x0] * (1 - fx) * fy
                + image[y0 + 1, x0 + 1] * fx * fy
            )
    return out


def test_affine_matches_the_reference_rotation_and_zoom():
    """Each image is rotated and zoomed about its centre by its own draws (smooth images, so
    OpenCV's 1/32-pixel coordinate rounding stays small)."""
    yy, xx = np.mgrid[0:12, 0:10].astype(np.float32)
    x = np.stack([np.sin(0.3 * xx + k) * np.cos(0.25 * yy) for k in range(4)])[..., None]
    out = preprocessing.augment_batch(
        x, _rngs(3, 4), ("affine",), affine_degrees=30, affine_scale=0.2
    )
    for i, rng in enumerate(_rngs(3, 4)):
        angle, log_zoom = rng.uniform(-30, 30), rng.uniform(-np.log(1.2), np.log(1.2))
        want = _affine_reference(x[i], angle, np.exp(log_zoom))
        np.testing.assert_allclose(out[i], want, atol=0.02)
    assert out.shape == x.shape and out.dtype == np.float32


def test_affine_quarter_turn_moves_a_point_up():
    """90 degrees: the pixel right of the centre goes above it (counter-clockwise on display)."""
    x = np.zeros((1, 9, 9, 1), np.float32)
    x[0, 4, 6] = 1.0  # row 4 (centre), column 6: two pixels right of the centre

    class Fixed:  # A generator whose draws are the given values.
        def __init__(self, *values):
            self.values = list(values)

        def uniform(self, lo, hi):
            return self.values.pop(0)

    out = preprocessing.augment_batch(x, [Fixed(90.0, 0.0)], ("affine",))
    assert out[0, 2, 4, 0] == pytest.approx(1.0, abs=1e-3) and out.sum() == pytest.approx(1.0)


def test_adding_affine_leaves_the_older_draws_unchanged():
    """affine draws after random_crop, flip and color: with a zero range it is the identity, so
    the batch equals the one without it (old runs' augmentation is unchanged)."""
    x = np.random.default_rng(0).uniform(-1, 1, (6, 8, 8, 3)).astype(np.float32)
    old = ("random_crop", "flip", "color")
    want = preprocessing.augment_batch(x, _rngs(4, 6), old)
    got = preprocessing.augment_batch(
        x, _rngs(4, 6), (*old, "affine"), affine_degrees=0.0, affine_scale=0.0
    )
    np.testing.assert_allclose(got, want, atol=1e-6)
    moved = preprocessing.augment_batch(x, _rngs(4, 6), (*old, "affine"))
    assert not np.allclose(moved, want, atol=1e-3)
