"""The one reader behind every source: PK training batches and padded evaluation, through grain.

Every source (folder, tfds catalog, the bundled digits) ends as a random-access sequence of
records plus a ``decode`` function (record -> ``[H, W, C]`` float32 in [-1, 1]), the identity label
and group of every record, and its train/val/test record indices. ``RecordDataset`` implements the
``FaceDataset`` interface of ``input_pipeline.py`` on top of that, so PK sampling, process slicing,
augmentation seeding, padding and grain's worker processes exist once for all sources:

* ``train_batches``: the global PK batch of step s is ``sampling.pk_batch_indices(seed, s)``; this
  process decodes rows ``sampling.process_slice(...)`` of it. Row r of step s is augmented with a
  generator seeded by (seed, s, r), so a batch is a pure function of (seed, step) and the union of
  the process slices is exactly the single-process batch, augmentation included;
* ``spec.rotation_classes`` R > 1 (Omniglot's customary class augmentation, Vinyals et al. 2016):
  training identity i is sampled as R identities, the r-th with its images turned by r * 360 / R
  degrees (``np.rot90``, before augmentation) and labelled i * R + r; evaluation is unchanged;
* ``spec.groups_per_batch`` G >= 1: the P identities of a batch come from G groups, P / G each
  (a turned identity keeps its identity's group), so the miner's negatives are within-group;
* ``eval_batches``: every record of a split once, in record order, unaugmented, the last batch
  padded with ``IGNORE_LABEL`` / group -1;
* decoding, cropping and augmentation run in ``spec.num_workers`` grain worker processes (each
  builds whole batches) with ``spec.prefetch`` batches in flight.

Records are either serialized tfds examples (``TfdsDecoder`` parses and preprocesses them) or, for
the in-memory digit sources, already decoded image arrays (``decode`` is the identity).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from facenet_jax.data import preprocessing, sampling, splits
from facenet_jax.data.spec import DataSpec

Batch = dict[str, np.ndarray]
Decoder = Callable[[Any], np.ndarray]  # record -> [H, W, C] float32 in [-1, 1]


def parse_record(raw: bytes, keys: Sequence[str]) -> dict[str, list[Any]]:
    """The values of ``keys`` in one serialized tfds record (a ``tf.train.Example``).

    Parsing only the features needed is ~10x faster than tfds's full numpy deserialization, which
    would otherwise cost more than decoding a small JPEG. Values come as lists: bytes for images
    and text, ints for labels, floats for boxes.
    """
    from tensorflow_datasets.proto import tf_example_pb2

    feature = tf_example_pb2.Example.FromString(raw).features.feature
    out = {}
    for key in keys:
        if key not in feature:
            raise KeyError(f"record has no feature {key!r}; it has {sorted(feature)}")
        kind = feature[key].WhichOneof("kind")
        out[key] = list(getattr(feature[key], kind).value) if kind else []
    return out


@dataclasses.dataclass(frozen=True)
class TfdsDecoder:
    """Serialized tfds record -> preprocessed image. Pickled into the grain worker processes.

    ``box_key`` names the stored face box feature (crop=detect on folders), "" for none.
    """

    image_key: str
    box_key: str
    spec: DataSpec

    def __call__(self, raw: bytes) -> np.ndarray:
        keys = (self.image_key, self.box_key) if self.box_key else (self.image_key,)
        record = parse_record(raw, keys)
        box = record[self.box_key] if self.box_key else None
        return preprocessing.preprocess_image(record[self.image_key][0], self.spec, box)


def read(source: Sequence[Any], indices: np.ndarray) -> list[Any]:
    """The records ``source[i]`` for i in ``indices`` (one batched read when the source can)."""
    getitems = getattr(source, "__getitems__", None)
    keys = [int(i) for i in indices]
    return list(getitems(keys)) if getitems is not None else [source[i] for i in keys]


@dataclasses.dataclass
class _TrainBatch:
    """step -> this process's rows of the global PK batch, decoded and augmented."""

    source: Sequence[Any]
    decode: Decoder
    labels: np.ndarray
    by_identity: list[np.ndarray]
    identity_groups: np.ndarray  # [len(by_identity)] group name of each sampled identity.
    spec: DataSpec
    seed: int
    rows: slice

    def indices(self, step: int) -> np.ndarray:
        """[P*K] record indices of the global batch of ``step``."""
        s = self.spec
        return sampling.pk_batch_indices(
            self.by_identity,
            p=s.identities_per_batch,
            k=s.images_per_identity,
            seed=self.seed,
            step=step,
            replace=s.sample_with_replacement,
            identity_groups=self.identity_groups,
            groups_per_batch=s.groups_per_batch,
        )

    def __call__(self, step: int) -> Batch:
        # Sampled entries are record * R + r: record ``record`` turned r * 360 / R degrees, a
        # class of its own (``rotation_classes``; R = 1 leaves records and labels as they are).
        turns = self.spec.rotation_classes
        idx, rot = np.divmod(self.indices(step)[self.rows], turns)
        images = np.stack([self.decode(r) for r in read(self.source, idx)], dtype=np.float32)
        if turns > 1:
            quarter_turns = rot * (4 // turns)
            images = np.stack([np.rot90(x, k) for x, k in zip(images, quarter_turns, strict=True)])
        if self.spec.augment:
            # One generator per global row: a row looks the same whichever process loads it.
            rows = range(self.rows.start, self.rows.stop)
            rngs = [np.random.default_rng([self.seed, step, r, 1]) for r in rows]
            images = preprocessing.augment_batch(
                images,
                rngs,
                self.spec.augment,
                crop_padding=self.spec.random_crop_padding,
                affine_degrees=self.spec.affine_degrees,
                affine_scale=self.spec.affine_scale,
            )
        labels = sampling.turned(self.labels[idx], rot, turns)
        return {"image": images, "label": labels.astype(np.int32)}


@dataclasses.dataclass
class _EvalBatch:
    """(indices, valid) -> an evaluation batch, label IGNORE_LABEL and group -1 on padding."""

    source: Sequence[Any]
    decode: Decoder
    labels: np.ndarray
    groups: np.ndarray

    def __call__(self, item: tuple[np.ndarray, np.ndarray]) -> Batch:
        idx, valid = item
        images = np.stack([self.decode(r) for r in read(self.source, idx)], dtype=np.float32)
        return {
            "image": images,
            "label": np.where(valid, self.labels[idx], sampling.IGNORE_LABEL).astype(np.int32),
            "group": np.where(valid, self.groups[idx], -1).astype(np.int32),
        }


def _ensure_absl_flags() -> None:
    """grain's worker processes read absl flags; outside an absl app, parse their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _iterate(dataset, num_workers: int, prefetch: int) -> Iterator[Batch]:
    """Iterates a grain MapDataset with prefetch threads and optional worker processes."""
    import grain

    ds = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, prefetch), prefetch_buffer_size=max(0, prefetch))
    )
    if num_workers > 0:
        _ensure_absl_flags()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=max(1, prefetch)
            )
        )
    it = iter(ds)
    try:
        if num_workers > 0:
            # Copy out of grain's shared memory so each segment is released right away.
            for batch in it:
                yield {k: np.array(v, copy=True) for k, v in batch.items()}
        else:
            yield from it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


class RecordDataset:
    """The FaceDataset interface over random-access records of labelled face images.

    Args:
      source: random-access records (``len`` and ``[i]``, optionally ``__getitems__``): a tfds
        ArrayRecord data source read as raw bytes, or an in-memory array of decoded images.
      decode: record -> [image_size, image_size, channels] float32 in [-1, 1]; pickled into the
        grain workers, so a top-level function or a dataclass like ``TfdsDecoder``.
      labels: [N] int identity label of every record (index into identity_names).
      groups: [N] int group of every record (index into group_names).
      splits: {"train", "val", "test"}: int record indices of each split (``splits.py``).
      spec: the run's data spec (P, K, augmentation, workers, input shape).
      seed: the run seed (``config.seed``): PK sampling and augmentation.
      extra_info: added to every ``split_info`` (e.g. skipped files, crop fallbacks).
    """

    def __init__(
        self,
        source: Sequence[Any],
        decode: Decoder,
        *,
        labels: np.ndarray,
        groups: np.ndarray,
        identity_names: list[str],
        group_names: list[str],
        splits: dict[str, np.ndarray],
        spec: DataSpec,
        seed: int,
        extra_info: dict[str, Any] | None = None,
    ):
        self.source = source
        self.decode = decode
        self.spec = spec
        self.seed = int(seed)
        self.labels = np.asarray(labels, np.int64)
        self.groups = np.asarray(groups, np.int64)
        self.identity_names = list(identity_names)
        self.group_names = list(group_names)
        self.splits = {name: np.asarray(idx, np.int64) for name, idx in splits.items()}
        self.extra_info = dict(extra_info or {})
        self.image_shape = spec.image_shape
        train = self._split("train")
        train_labels = np.full(len(self.labels), sampling.IGNORE_LABEL)
        train_labels[train] = self.labels[train]
        by_identity = sampling.group_by_label(train_labels, spec.min_images).values()
        # rotation_classes R: identity i is R sampled identities, entry record * R + r in the
        # r-th (its images turned r * 360 / R degrees, label i * R + r; _TrainBatch decodes it).
        # A turned identity stays in its identity's group (groups_per_batch).
        turns = spec.rotation_classes
        self._by_identity = [
            sampling.turned(idx, r, turns) for idx in by_identity for r in range(turns)
        ]
        self._identity_groups = np.repeat(  # Names, so an error can say which groups.
            np.asarray([self.group_names[self.groups[idx[0]]] for idx in by_identity]), turns
        )
        self._report()

    def _report(self) -> None:
        counts = np.bincount(self.labels, minlength=len(self.identity_names))
        small_ids = np.flatnonzero((counts > 0) & (counts < self.spec.min_images))
        small = [self.identity_names[i] for i in small_ids]
        if small:
            logging.warning(
                "%d identities have fewer than %d images: excluded from triplet training, kept "
                "for evaluation as distractors: %s%s",
                len(small),
                self.spec.min_images,
                ", ".join(small[:10]),
                " ..." if len(small) > 10 else "",
            )
        logging.info(
            "dataset: %d images, %d identities; %s",
            len(self.labels),
            int((counts > 0).sum()),
            "; ".join(
                f"{s} {self.split_info(s)['num_images']} images / "
                f"{self.split_info(s)['num_identities']} identities"
                for s in self.splits
            ),
        )

    def train_batches(
        self, start_step: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[Batch]:
        """This process's share of the global PK batch of every step from ``start_step`` on."""
        import grain

        fn = self._train_batch(
            sampling.process_slice(self.spec.batch_size, process_index, process_count)
        )
        fn.indices(start_step)  # Fail here, not in a worker, when P or K cannot be met.
        steps = grain.MapDataset.range(start_step, sys.maxsize).map(fn)
        return _iterate(steps, self.spec.num_workers, self.spec.prefetch)

    def _train_batch(self, rows: slice) -> _TrainBatch:
        return _TrainBatch(
            source=self.source,
            decode=self.decode,
            labels=self.labels,
            by_identity=self._by_identity,
            identity_groups=self._identity_groups,
            spec=self.spec,
            seed=self.seed,
            rows=rows,
        )

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        """Every image of ``split`` once, in record order; the last batch padded."""
        import grain

        idx = self._split(split)
        items = [(idx[i], valid) for i, valid in sampling.eval_batch_indices(len(idx), batch_size)]
        if not items:
            return iter(())
        fn = _EvalBatch(self.source, self.decode, self.labels, self.groups)
        dataset = grain.MapDataset.source(items).map(fn)
        return _iterate(dataset, self.spec.num_workers, self.spec.prefetch)

    def check_feasible(self, eval_split: str) -> None:
        """Raises ValueError naming the config fields to change when the train split cannot fill
        P x K batches or ``eval_split`` (``config.eval.split``) cannot be evaluated
        (``splits.check_feasible``); training calls it before compiling anything."""
        info = self.extra_info
        what = info.get("root") or info.get("tfds_name") or f"source {self.spec.source!r}"
        splits.check_feasible(
            self.labels, self.groups, self.spec, eval_split, self.splits, what=str(what)
        )
        if self.spec.groups_per_batch:  # Enough groups of P / G identities: the sampler says.
            self._train_batch(slice(0, self.spec.batch_size)).indices(0)

    def split_info(self, split: str) -> dict[str, Any]:
        idx = self._split(split)
        return {
            "num_images": int(len(idx)),
            "num_identities": int(len(np.unique(self.labels[idx]))),
            "identity_names": self.identity_names,
            "group_names": self.group_names,
            **self.extra_info,
        }

    def _split(self, split: str) -> np.ndarray:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; this dataset has {list(self.splits)}")
        return self.splits[split]
