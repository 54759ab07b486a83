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

from facenet_jax import preprocessing, sampling

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


def _create_folder_dataset(config: ml_collections.ConfigDict) -> FaceDataset:
    from facenet_jax import folder_dataset

    return folder_dataset.create_dataset(config)


def _create_tfds_dataset(config: ml_collections.ConfigDict) -> FaceDataset:
    from facenet_jax import folder_dataset

    return folder_dataset.create_catalog_dataset(config)


SOURCES: dict[str, Callable[[ml_collections.ConfigDict], FaceDataset]] = {
    "digits": create_digits_dataset,
    "folder": _create_folder_dataset,
    "tfds": _create_tfds_dataset,
}


def create_dataset(config: ml_collections.ConfigDict) -> FaceDataset:
    """Builds the dataset named by ``config.data.source``."""
    source = config.data.source
    if source not in SOURCES:
        raise ValueError(f"config.data.source: unknown source {source!r}; allowed: {list(SOURCES)}")
    return SOURCES[source](config)
