"""Image preprocessing: scaling and training-time augmentation (NumPy, runs in the input workers).

Images reaching the model are float32 [H, W, C] in [-1, 1].
"""

from __future__ import annotations

import numpy as np

AUGMENTATIONS = ("random_crop", "flip", "color")


def check_augmentations(names) -> tuple[str, ...]:
    """Validates ``config.data.augment``; raises ValueError naming the field and allowed values."""
    names = tuple(names)
    bad = [n for n in names if n not in AUGMENTATIONS]
    if bad:
        raise ValueError(
            f"config.data.augment: unknown augmentation(s) {bad}; allowed: {list(AUGMENTATIONS)}"
        )
    return names


def to_unit_range(images: np.ndarray, max_value: float) -> np.ndarray:
    """Maps pixel values in [0, max_value] to float32 in [-1, 1]."""
    return (np.asarray(images, np.float32) * (2.0 / max_value) - 1.0).astype(np.float32)


def augment_batch(
    images: np.ndarray,
    rng: np.random.Generator,
    augment: tuple[str, ...],
    *,
    crop_padding: int = 2,
) -> np.ndarray:
    """Applies the selected augmentations independently to every image of a batch.

    Args:
      images: [B, H, W, C] float32 in [-1, 1].
      rng: generator seeded from (seed, step), so augmentation is reproducible on resume.
      augment: subset of AUGMENTATIONS.
      crop_padding: random_crop pads each side by this many pixels (edge values) and crops back.

    Returns:
      [B, H, W, C] float32 in [-1, 1].
    """
    out = np.array(images, dtype=np.float32, copy=True)
    b, h, w, _ = out.shape
    if "random_crop" in augment and crop_padding > 0:
        pad = crop_padding
        padded = np.pad(out, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
        dy = rng.integers(0, 2 * pad + 1, size=b)
        dx = rng.integers(0, 2 * pad + 1, size=b)
        for i in range(b):
            out[i] = padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    if "flip" in augment:
        flip = rng.random(b) < 0.5
        out[flip] = out[flip, :, ::-1]
    if "color" in augment:
        # Brightness and contrast jitter around the per-image mean.
        contrast = rng.uniform(0.7, 1.3, size=(b, 1, 1, 1)).astype(np.float32)
        brightness = rng.uniform(-0.2, 0.2, size=(b, 1, 1, 1)).astype(np.float32)
        mean = out.mean(axis=(1, 2, 3), keepdims=True)
        out = np.clip((out - mean) * contrast + mean + brightness, -1.0, 1.0)
    return out
