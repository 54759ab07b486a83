"""Datasets for triplet training: PK training batches and exhaustive, padded evaluation batches.

Every source (``config.data.source``) builds an object with the ``FaceDataset`` interface:

* ``train_batches(start_step, process_index, process_count)`` yields this process's share of each
  global PK batch, ``{"image": [B_proc, H, W, C] float32 in [-1, 1], "label": [B_proc] int32}``,
  for steps ``start_step, start_step + 1, ...``; batches are a pure function of (seed, step).
* ``eval_batches(split, batch_size)`` visits every image of a split once:
  ``{"image": [N, H, W, C], "label": [N] int32 (IGNORE_LABEL on padding), "group": [N] int32}``.
* ``split_info(split)`` describes a split (image/identity counts, identity and group names).

Sources are looked up by name in ``SOURCES``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import ml_collections
import numpy as np

from facenet_jax.data import preprocessing, sampling

Batch = dict[str, np.ndarray]


class FaceDataset(Protocol):
    image_shape: tuple[int, int, int]

    def train_batches(
        self, start_step: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[Batch]: ...

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]: ...

    def split_info(self, split: str) -> dict[str, Any]: ...


@dataclasses.dataclass
class InMemorySplit:
    """A decoded split: images [N, H, W, C] float32 in [-1, 1], labels [N], groups [N]."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    identity_names: list[str]
    group_names: list[str]


class InMemoryDataset:
    """PK training and padded evaluation over splits that fit in memory (digits, small sets)."""

    def __init__(self, splits: dict[str, InMemorySplit], config: ml_collections.ConfigDict):
        self.splits = splits
        self.config = config
        train = splits["train"]
        self.image_shape = tuple(train.images.shape[1:])
        min_count = max(2, config.data.min_images_per_identity)
        self._by_identity = list(sampling.group_by_label(train.labels, min_count).values())
        self.augment = preprocessing.check_augmentations(config.data.augment)

    def train_batches(
        self, start_step: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[Batch]:
        d = self.config.data
        b = d.identities_per_batch * d.images_per_identity
        rows = sampling.process_slice(b, process_index, process_count)
        train = self.splits["train"]
        step = start_step
        while True:
            idx = sampling.pk_batch_indices(
                self._by_identity,
                p=d.identities_per_batch,
                k=d.images_per_identity,
                seed=self.config.seed,
                step=step,
                replace=d.sample_with_replacement,
            )
            # Augment the whole global batch with one (seed, step) generator, then keep this
            # process's rows: batches do not depend on the number of processes.
            rng = np.random.default_rng([self.config.seed, step, 1])
            images = preprocessing.augment_batch(
                train.images[idx], rng, self.augment, crop_padding=d.random_crop_padding
            )[rows]
            yield {"image": images, "label": train.labels[idx[rows]].astype(np.int32)}
            step += 1

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        s = self._split(split)
        for idx, valid in sampling.eval_batch_indices(len(s.labels), batch_size):
            yield {
                "image": s.images[idx],
                "label": np.where(valid, s.labels[idx], sampling.IGNORE_LABEL).astype(np.int32),
                "group": np.where(valid, s.groups[idx], -1).astype(np.int32),
            }

    def split_info(self, split: str) -> dict[str, Any]:
        s = self._split(split)
        return {
            "num_images": int(len(s.labels)),
            "num_identities": int(len(np.unique(s.labels))),
            "identity_names": s.identity_names,
            "group_names": s.group_names,
        }

    def _split(self, split: str) -> InMemorySplit:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; this dataset has {sorted(self.splits)}")
        return self.splits[split]


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


def create_digits_dataset(config: ml_collections.ConfigDict) -> InMemoryDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images): train classes vs never-seen classes.

    ``config.data.train_classes`` are the training identities; the other classes form both the
    "test" and "val" splits (unseen identities), mirroring one-shot evaluation on new people.
    """
    from sklearn.datasets import load_digits

    d = config.data
    if d.channels != 1:
        raise ValueError(f"config.data.channels: digits are grey, use 1 (got {d.channels})")
    digits = load_digits()
    images = digits.images.astype(np.float32)[..., None]  # [1797, 8, 8, 1] in [0, 16]
    images = _resize_batch(images, d.image_size)
    images = preprocessing.to_unit_range(images, 16.0)
    labels = digits.target.astype(np.int32)
    train_classes = set(int(c) for c in d.train_classes)
    if not train_classes or not train_classes < set(range(10)):
        raise ValueError(
            "config.data.train_classes must be a non-empty proper subset of 0..9, "
            f"got {sorted(train_classes)}"
        )
    is_train = np.isin(labels, sorted(train_classes))
    names = [str(c) for c in range(10)]

    def split(mask: np.ndarray) -> InMemorySplit:
        return InMemorySplit(
            images=images[mask],
            labels=labels[mask],
            groups=np.zeros(int(mask.sum()), np.int32),
            identity_names=names,
            group_names=["all"],
        )

    test = split(~is_train)
    return InMemoryDataset({"train": split(is_train), "val": test, "test": test}, config)


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


def create_digit_pairs_dataset(config: ml_collections.ConfigDict) -> InMemoryDataset:
    """Two-digit numbers written with scikit-learn's bundled 8x8 digits: 100 identities.

    Identity ``n = 10 a + b`` (00..99) is the number whose tens digit ``a`` and units digit ``b``
    sit side by side: each of its ``config.data.digit_pair_images`` images puts a random image of
    ``a`` left of a random image of ``b`` ([8, 16], resized to image_size x image_size). This is
    the Double-MNIST construction of few-shot benchmarks, on data that ships with scikit-learn.

    The 100 numbers are split by identity (``val_fraction``, ``test_fraction``, seeded by
    ``split_seed``), and the 1,797 digit images by pool: training numbers are composed only of
    images from a 75% pool, validation and test numbers only of the other 25%. Held-out
    identities are therefore numbers never seen in training, written with images never seen in
    training: the one-shot setting of face verification, where new people are new combinations
    of features the network has learnt.
    """
    from sklearn.datasets import load_digits

    d = config.data
    if d.channels != 1:
        raise ValueError(f"config.data.channels: digits are grey, use 1 (got {d.channels})")
    per_number = int(d.digit_pair_images)
    if per_number < 2:
        raise ValueError(f"config.data.digit_pair_images must be >= 2, got {per_number}")
    num_val, num_test = round(100 * d.val_fraction), round(100 * d.test_fraction)
    if num_test < 2 or num_val < 0 or num_val + num_test > 98:
        raise ValueError(
            "config.data.val_fraction / test_fraction must leave >= 2 test and >= 2 training "
            f"numbers of 100, got {d.val_fraction} / {d.test_fraction}"
        )
    digits = load_digits()
    plan = digit_pair_plan(digits.target, d.split_seed, num_val, num_test, per_number)
    names = [f"{n:02d}" for n in range(100)]

    def split(labels: np.ndarray, left: np.ndarray, right: np.ndarray) -> InMemorySplit:
        pairs = np.concatenate([digits.images[left], digits.images[right]], axis=2)  # [N, 8, 16]
        images = _resize_batch(pairs.astype(np.float32)[..., None], d.image_size)
        return InMemorySplit(
            images=preprocessing.to_unit_range(images, 16.0),
            labels=labels,
            groups=np.zeros(len(labels), np.int32),
            identity_names=names,
            group_names=["all"],
        )

    splits = {name: split(*rows) for name, rows in plan.items() if len(rows[0])}
    if "val" not in splits:
        splits["val"] = splits["test"]
    return InMemoryDataset(splits, config)


def _create_folder_dataset(config: ml_collections.ConfigDict) -> FaceDataset:
    from facenet_jax.data import records

    return records.create_dataset(config)


def _create_tfds_dataset(config: ml_collections.ConfigDict) -> FaceDataset:
    from facenet_jax.data import records

    return records.create_catalog_dataset(config)


SOURCES: dict[str, Callable[[ml_collections.ConfigDict], FaceDataset]] = {
    "digits": create_digits_dataset,
    "digit_pairs": create_digit_pairs_dataset,
    "folder": _create_folder_dataset,
    "tfds": _create_tfds_dataset,
}


def create_dataset(config: ml_collections.ConfigDict) -> FaceDataset:
    """Builds the dataset named by ``config.data.source``."""
    source = config.data.source
    if source not in SOURCES:
        raise ValueError(f"config.data.source: unknown source {source!r}; allowed: {list(SOURCES)}")
    return SOURCES[source](config)
