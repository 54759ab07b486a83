"""Datasets for triplet training: PK training batches and exhaustive, padded evaluation batches.

Every source (``config.data.source``) builds an object with the ``FaceDataset`` interface, all of
them the shared reader ``records.RecordDataset``:

* ``train_batches(start_step, process_index, process_count)`` yields this process's share of each
  global PK batch, ``{"image": [B_proc, H, W, C] float32 in [-1, 1], "label": [B_proc] int32}``,
  for steps ``start_step, start_step + 1, ...``; batches are a pure function of (seed, step).
* ``eval_batches(split, batch_size)`` visits every image of a split once:
  ``{"image": [N, H, W, C], "label": [N] int32 (IGNORE_LABEL on padding), "group": [N] int32}``.
* ``split_info(split)`` describes a split (image/identity counts, identity and group names).
* ``check_feasible(eval_split)`` raises, naming the config fields, when P x K batches or the
  evaluation of ``eval_split`` cannot be formed (``splits.check_feasible``).

Sources are looked up by name in ``SOURCES``; each is a function ``(DataSpec, seed) -> dataset``:

    digit_pairs, digits   digits.py    bundled scikit-learn digits, in memory
    folder                folder.py    ROOT/[<group>/]<identity>/<image>, prepared once (tfds)
    tfds                  catalog.py   a prepared tfds catalog dataset
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import ml_collections
import numpy as np

from facenet_jax.data.spec import DataSpec

Batch = dict[str, np.ndarray]


class FaceDataset(Protocol):
    image_shape: tuple[int, int, int]

    def train_batches(
        self, start_step: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[Batch]: ...

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]: ...

    def split_info(self, split: str) -> dict[str, Any]: ...

    def check_feasible(self, eval_split: str) -> None: ...


def _digits(spec: DataSpec, seed: int) -> FaceDataset:
    from facenet_jax.data import digits

    return digits.create_digits_dataset(spec, seed)


def _digit_pairs(spec: DataSpec, seed: int) -> FaceDataset:
    from facenet_jax.data import digits

    return digits.create_digit_pairs_dataset(spec, seed)


def _folder(spec: DataSpec, seed: int) -> FaceDataset:
    from facenet_jax.data import folder

    return folder.create_folder_dataset(spec, seed)


def _catalog(spec: DataSpec, seed: int) -> FaceDataset:
    from facenet_jax.data import catalog

    return catalog.create_catalog_dataset(spec, seed)


# Imported lazily: the folder and catalog sources import tensorflow_datasets.
SOURCES: dict[str, Callable[[DataSpec, int], FaceDataset]] = {
    "digit_pairs": _digit_pairs,
    "digits": _digits,
    "folder": _folder,
    "tfds": _catalog,
}


def create_dataset(config: ml_collections.ConfigDict) -> FaceDataset:
    """Builds the dataset named by ``config.data.source`` (seeded by ``config.seed``)."""
    spec = DataSpec.from_config(config.data)
    if spec.source not in SOURCES:
        raise ValueError(
            f"config.data.source: unknown source {spec.source!r}; allowed: {list(SOURCES)}"
        )
    return SOURCES[spec.source](spec, int(config.seed))
