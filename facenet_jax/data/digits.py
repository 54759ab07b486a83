"""The bundled digit sources, from scikit-learn's 8x8 digits (no download), served in memory.

* ``digits``: one identity per digit; ``spec.train_classes`` train, the other digits are both
  "val" and "test" (never-seen identities).
* ``digit_pairs`` (the default): 100 identities, the numbers 00-99 written as two digit images
  side by side (the Double-MNIST construction), split by identity, held-out numbers written only
  with digit images training never sees.

Both decode every image once, up front, to ``[N, S, S, 1]`` float32 in [-1, 1], and hand the array
to the shared reader (``records.RecordDataset``, with ``decoded`` as its decode function): PK
batching, augmentation and padded evaluation are the same code as for folders.
"""

from __future__ import annotations

import numpy as np

from facenet_jax.data import preprocessing, records
from facenet_jax.data.spec import DataSpec


def _resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of [N, h, w, C] float images to [N, size, size, C] (Pillow, per image)."""
    from PIL import Image

    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, images.shape[-1]), np.float32)
    for i, img in enumerate(images):
        for c in range(images.shape[-1]):
            out[i, :, :, c] = np.asarray(
                Image.fromarray(img[:, :, c]).resize((size, size), Image.BILINEAR)
            )
    return out


def _digit_images(spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: [1797, 8, 8] images in [0, 16], [1797] labels; checks channels."""
    from sklearn.datasets import load_digits

    if spec.channels != 1:
        raise ValueError(f"config.data.channels: digits are grey, use 1 (got {spec.channels})")
    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int32)


def decoded(image: np.ndarray) -> np.ndarray:
    """The records of the digit sources are decoded images already: [S, S, 1] float32."""
    return image


def _in_memory(
    images: np.ndarray,
    labels: np.ndarray,
    identity_names: list[str],
    splits: dict[str, np.ndarray],
    spec: DataSpec,
    seed: int,
) -> records.RecordDataset:
    """The shared reader over decoded [N, S, S, 1] float32 images (one group, "all")."""
    return records.RecordDataset(
        images,
        decoded,
        labels=labels,
        groups=np.zeros(len(labels), np.int64),
        identity_names=identity_names,
        group_names=["all"],
        splits=splits,
        spec=spec,
        seed=seed,
    )


def create_digits_dataset(spec: DataSpec, seed: int) -> records.RecordDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images): train classes vs never-seen classes.

    ``spec.train_classes`` are the training identities; the other classes form both the
    "test" and "val" splits (unseen identities), mirroring one-shot evaluation on new people.
    """
    raw, labels = _digit_images(spec)
    train_classes = set(spec.train_classes)
    if not train_classes or not train_classes < set(range(10)):
        raise ValueError(
            "config.data.train_classes must be a non-empty proper subset of 0..9, "
            f"got {sorted(train_classes)}"
        )
    images = preprocessing.to_unit_range(_resize_batch(raw[..., None], spec.image_size), 16.0)
    is_train = np.isin(labels, sorted(train_classes))
    held_out = np.flatnonzero(~is_train)
    splits = {"train": np.flatnonzero(is_train), "val": held_out, "test": held_out}
    return _in_memory(images, labels, [str(c) for c in range(10)], splits, spec, seed)


def digit_pair_plan(
    digit_labels: np.ndarray, seed: int, num_val: int, num_test: int, per_number: int
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Which digit images compose which number, per split (``create_digit_pairs_dataset``).

    Args:
      digit_labels: [M] digit (0-9) of each source image.
      seed: split seed; the plan is a pure function of the arguments.
      num_val, num_test: numbers held out for validation and test (the rest train).
      per_number: images composed for each number.

    Returns:
      ``{split: (labels, left, right)}``: [N] int32 numbers ``10 a + b`` and [N] int64 indices
      of the source images of ``a`` (left) and ``b`` (right), ``per_number`` rows per number.
      Train rows use only images of a 75% pool, val/test rows only the other images.
    """
    rng = np.random.default_rng([seed, 0xD161])
    order = rng.permutation(100)
    numbers = {
        "test": np.sort(order[:num_test]),
        "val": np.sort(order[num_test : num_test + num_val]),
        "train": np.sort(order[num_test + num_val :]),
    }
    train_pool = rng.random(len(digit_labels)) < 0.75
    plan = {}
    for name, nums in numbers.items():
        pool = train_pool if name == "train" else ~train_pool
        by_digit = [np.flatnonzero((digit_labels == k) & pool) for k in range(10)]
        left = [rng.choice(by_digit[n // 10], per_number) for n in nums]
        right = [rng.choice(by_digit[n % 10], per_number) for n in nums]
        plan[name] = (
            np.repeat(nums, per_number).astype(np.int32),
            np.concatenate(left) if len(nums) else np.zeros(0, np.int64),
            np.concatenate(right) if len(nums) else np.zeros(0, np.int64),
        )
    return plan


def create_digit_pairs_dataset(spec: DataSpec, seed: int) -> records.RecordDataset:
    """Two-digit numbers written with scikit-learn's bundled 8x8 digits: 100 identities.

    Identity ``n = 10 a + b`` (00..99) is the number whose tens digit ``a`` and units digit ``b``
    sit side by side: each of its ``spec.digit_pair_images`` images puts a random image of
    ``a`` left of a random image of ``b`` ([8, 16], resized to image_size x image_size). This is
    the Double-MNIST construction of few-shot benchmarks, on data that ships with scikit-learn.

    The 100 numbers are split by identity (``val_fraction``, ``test_fraction``, seeded by
    ``split_seed``), and the 1,797 digit images by pool: training numbers are composed only of
    images from a 75% pool, validation and test numbers only of the other 25%. Held-out
    identities are therefore numbers never seen in training, written with images never seen in
    training: the one-shot setting of face verification, where new people are new combinations
    of features the network has learnt.
    """
    per_number = spec.digit_pair_images
    if per_number < 2:
        raise ValueError(f"config.data.digit_pair_images must be >= 2, got {per_number}")
    num_val, num_test = round(100 * spec.val_fraction), round(100 * spec.test_fraction)
    if num_test < 2 or num_val < 0 or num_val + num_test > 98:
        raise ValueError(
            "config.data.val_fraction / test_fraction must leave >= 2 test and >= 2 training "
            f"numbers of 100, got {spec.val_fraction} / {spec.test_fraction}"
        )
    digits, digit_labels = _digit_images(spec)
    plan = digit_pair_plan(digit_labels, spec.split_seed, num_val, num_test, per_number)
    images, labels, splits, start = [], [], {}, 0
    for name in ("train", "val", "test"):
        numbers, left, right = plan[name]
        pairs = np.concatenate([digits[left], digits[right]], axis=2)[..., None]  # [n, 8, 16, 1]
        images.append(preprocessing.to_unit_range(_resize_batch(pairs, spec.image_size), 16.0))
        labels.append(numbers)
        splits[name] = np.arange(start, start + len(numbers))
        start += len(numbers)
    if not len(splits["val"]):
        splits["val"] = splits["test"]
    names = [f"{n:02d}" for n in range(100)]
    return _in_memory(np.concatenate(images), np.concatenate(labels), names, splits, spec, seed)
