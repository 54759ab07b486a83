"""Folder and tfds-catalog face datasets: PK training batches and padded evaluation through grain.

Both sources end as a random-access tfds ArrayRecord data source (``tfds.data_source`` /
``builder.as_data_source``; no TensorFlow at run time) plus the identity label, group and
(folders) face box of every record. ``RecordDataset`` implements the ``FaceDataset`` interface of
``input_pipeline.py`` on top of it:

* splits: "train", "val", "test" by identity (disjoint identities, stratified over groups) or by
  image (``config.data.split_by``), deterministic from ``config.data.split_seed``;
* ``train_batches``: the global PK batch of step s is ``sampling.pk_batch_indices(seed, s)``; this
  process decodes rows ``sampling.process_slice(...)`` of it. Row r of step s is augmented with a
  generator seeded by (seed, s, r), so a batch is a pure function of (seed, step) and the union of
  the process slices is exactly the single-process batch, augmentation included;
* decoding, cropping and augmentation run in ``config.data.num_workers`` grain worker processes
  (each builds whole batches) with ``config.data.prefetch`` batches in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from facenet_jax.data import folder_builder, preprocessing, sampling

Batch = dict[str, np.ndarray]
SPLITS = ("train", "val", "test")
SPLIT_BY = ("identity", "image")


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


def split_indices(
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    by: str = "identity",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    min_images: int = 2,
) -> dict[str, np.ndarray]:
    """Deterministic train/val/test record indices.

    by="identity": identities with >= min_images images are shuffled within each group and
    round(fraction * n_group) of them go to val and to test, the rest to train (disjoint
    identities). Identities with fewer images cannot form triplets: they go to val/test (in the
    ratio val_fraction : test_fraction) as distractors, or stay in train (unsampled) when both
    fractions are 0.
    by="image": every identity keeps round(fraction * n) of its images, shuffled, for val and for
    test (at least 2 stay in train); identities with < min_images images go to test (val if
    test_fraction is 0) as distractors.

    Args:
      labels: [N] int identity label of every record.
      groups: [N] int group of every record (None: one group).

    Returns:
      {"train", "val", "test"}: sorted int64 record indices, a partition of range(N).
    """
    labels = np.asarray(labels)
    groups = np.zeros_like(labels) if groups is None else np.asarray(groups)
    if by not in SPLIT_BY:
        raise ValueError(f"config.data.split_by: unknown value {by!r}; allowed: {list(SPLIT_BY)}")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            "config.data.val_fraction and test_fraction must be >= 0 with a sum < 1, got "
            f"{val_fraction} and {test_fraction}"
        )
    rng = np.random.default_rng([seed, 0x5B117])
    by_label = sampling.group_by_label(labels)
    small = [lab for lab, idx in by_label.items() if len(idx) < min_images]
    held = val_fraction + test_fraction
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}

    def distractor_split() -> str:
        if held == 0:
            return "train"
        return "val" if rng.random() < val_fraction / held else "test"

    if by == "identity":
        group_of = {lab: int(groups[idx[0]]) for lab, idx in by_label.items()}
        for g in sorted(set(group_of.values())):
            ids = [lab for lab in by_label if group_of[lab] == g and lab not in small]
            ids = list(rng.permutation(ids)) if ids else []
            n_val, n_test = _round(val_fraction * len(ids)), _round(test_fraction * len(ids))
            for j, lab in enumerate(ids):
                name = "val" if j < n_val else "test" if j < n_val + n_test else "train"
                out[name].append(by_label[int(lab)])
        for lab in small:
            out[distractor_split()].append(by_label[lab])
    else:
        for lab, idx in by_label.items():
            if lab in small:
                name = "test" if test_fraction > 0 else "val" if val_fraction > 0 else "train"
                out[name].append(idx)
                continue
            idx = rng.permutation(idx)
            n_val, n_test = _round(val_fraction * len(idx)), _round(test_fraction * len(idx))
            while len(idx) - n_val - n_test < 2:
                n_test, n_val = (n_test - 1, n_val) if n_test >= n_val else (n_test, n_val - 1)
            out["val"].append(idx[:n_val])
            out["test"].append(idx[n_val : n_val + n_test])
            out["train"].append(idx[n_val + n_test :])
    return {
        s: np.sort(np.concatenate(v)).astype(np.int64) if v else np.zeros(0, np.int64)
        for s, v in out.items()
    }


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


@dataclasses.dataclass
class _Decoder:
    """Serialized record -> preprocessed image. Pickled into the grain worker processes."""

    image_key: str
    box_key: str
    data_config: dict[str, Any]

    def __call__(self, raw: bytes) -> np.ndarray:
        keys = (self.image_key, self.box_key) if self.box_key else (self.image_key,)
        record = parse_record(raw, keys)
        box = record[self.box_key] if self.box_key else None
        return preprocessing.preprocess_image(record[self.image_key][0], self.data_config, box)


def _read(source: Sequence[bytes], indices: np.ndarray) -> list[bytes]:
    getitems = getattr(source, "__getitems__", None)
    keys = [int(i) for i in indices]
    return list(getitems(keys)) if getitems is not None else [source[i] for i in keys]


@dataclasses.dataclass
class _TrainBatch:
    """step -> this process's rows of the global PK batch, decoded and augmented."""

    source: Sequence[bytes]
    decode: _Decoder
    labels: np.ndarray
    by_identity: list[np.ndarray]
    p: int
    k: int
    seed: int
    replace: bool
    rows: slice
    augment: tuple[str, ...]
    crop_padding: int

    def __call__(self, step: int) -> Batch:
        idx = sampling.pk_batch_indices(
            self.by_identity, p=self.p, k=self.k, seed=self.seed, step=step, replace=self.replace
        )[self.rows]
        images = np.stack([self.decode(r) for r in _read(self.source, idx)])
        if self.augment:
            for j, row in enumerate(range(self.rows.start, self.rows.stop)):
                rng = np.random.default_rng([self.seed, step, row, 1])
                images[j] = preprocessing.augment_batch(
                    images[j : j + 1], rng, self.augment, crop_padding=self.crop_padding
                )[0]
        return {"image": images, "label": self.labels[idx].astype(np.int32)}


@dataclasses.dataclass
class _EvalBatch:
    """(indices, valid) -> an evaluation batch, label IGNORE_LABEL and group -1 on padding."""

    source: Sequence[bytes]
    decode: _Decoder
    labels: np.ndarray
    groups: np.ndarray

    def __call__(self, item: tuple[np.ndarray, np.ndarray]) -> Batch:
        idx, valid = item
        images = np.stack([self.decode(r) for r in _read(self.source, idx)])
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
    """The FaceDataset interface over a random-access tfds source of encoded face images.

    Args:
      source: random access serialized records (a tfds ArrayRecord data source read with
        ``DeserializeMethod.RAW_BYTES``), each with the encoded image under ``image_key`` and, for
        crop=detect, the face box under ``box_key``.
      labels: [N] int identity label of every record (index into identity_names).
      groups: [N] int group of every record (index into group_names).
      config: the run config (data.* fields, seed).
      extra_info: added to every ``split_info`` (e.g. skipped files, crop fallbacks).
    """

    def __init__(
        self,
        source: Sequence[bytes],
        *,
        labels: np.ndarray,
        groups: np.ndarray,
        identity_names: list[str],
        group_names: list[str],
        config: ml_collections.ConfigDict,
        image_key: str = "image",
        box_key: str = "",
        extra_info: dict[str, Any] | None = None,
    ):
        d = config.data
        self.source = source
        self.config = config
        self.labels = np.asarray(labels, np.int64)
        self.groups = np.asarray(groups, np.int64)
        self.identity_names = list(identity_names)
        self.group_names = list(group_names)
        self.extra_info = dict(extra_info or {})
        self.augment = preprocessing.check_augmentations(d.augment)
        preprocessing.check_crop(d.crop)
        self.image_shape = (int(d.image_size), int(d.image_size), int(d.channels))
        self.min_images = max(2, int(d.min_images_per_identity))
        self.splits = split_indices(
            self.labels,
            self.groups,
            by=d.get("split_by", "identity"),
            val_fraction=float(d.val_fraction),
            test_fraction=float(d.test_fraction),
            seed=int(d.split_seed),
            min_images=self.min_images,
        )
        train_labels = np.full(len(self.labels), sampling.IGNORE_LABEL)
        train_labels[self.splits["train"]] = self.labels[self.splits["train"]]
        self._by_identity = list(sampling.group_by_label(train_labels, self.min_images).values())
        self.decode = _Decoder(image_key, box_key, d.to_dict())
        self._report()

    def _report(self) -> None:
        counts = np.bincount(self.labels, minlength=len(self.identity_names))
        small_ids = np.flatnonzero((counts > 0) & (counts < self.min_images))
        small = [self.identity_names[i] for i in small_ids]
        if small:
            logging.warning(
                "%d identities have fewer than %d images: excluded from triplet training, kept "
                "for evaluation as distractors: %s%s",
                len(small),
                self.min_images,
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
                for s in SPLITS
            ),
        )

    def train_batches(
        self, start_step: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[Batch]:
        """This process's share of the global PK batch of every step from ``start_step`` on."""
        import grain

        d = self.config.data
        fn = _TrainBatch(
            source=self.source,
            decode=self.decode,
            labels=self.labels,
            by_identity=self._by_identity,
            p=int(d.identities_per_batch),
            k=int(d.images_per_identity),
            seed=int(self.config.seed),
            replace=bool(d.sample_with_replacement),
            rows=sampling.process_slice(
                d.identities_per_batch * d.images_per_identity, process_index, process_count
            ),
            augment=self.augment,
            crop_padding=int(d.random_crop_padding),
        )
        # Fail here, not in a worker, when P or K cannot be met.
        sampling.pk_batch_indices(
            fn.by_identity, p=fn.p, k=fn.k, seed=fn.seed, step=start_step, replace=fn.replace
        )
        steps = grain.MapDataset.range(start_step, sys.maxsize).map(fn)
        return _iterate(steps, int(d.num_workers), int(d.prefetch))

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        """Every image of ``split`` once, in record order; the last batch padded."""
        import grain

        idx = self._split(split)
        items = [(idx[i], valid) for i, valid in sampling.eval_batch_indices(len(idx), batch_size)]
        if not items:
            return iter(())
        fn = _EvalBatch(self.source, self.decode, self.labels, self.groups)
        d = self.config.data
        return _iterate(grain.MapDataset.source(items).map(fn), int(d.num_workers), int(d.prefetch))

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
            raise ValueError(f"unknown split {split!r}; this dataset has {list(SPLITS)}")
        return self.splits[split]


def prepare_once(prepare: Callable[[], Any]) -> Any:
    """Runs ``prepare`` on process 0 first, then (after a barrier) on the other processes.

    In a multi-host run every process builds the dataset; preparing concurrently would have
    several processes write the same tfds directory. Process 0 prepares alone; the others then
    find the data prepared (shared ``data_dir``) and only read it, or prepare their own copy
    (host-local ``data_dir``). Single-process runs just call ``prepare``.
    """
    import jax  # Not at module level: grain workers import this module and need no JAX.
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return prepare()

    result = prepare() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("facenet_jax.data.records.prepare")
    return prepare() if result is None else result


def create_dataset(config: ml_collections.ConfigDict) -> RecordDataset:
    """``config.data.source = "folder"``: prepares ``config.data.root`` once, then reads it."""
    import tensorflow_datasets as tfds

    d = config.data
    crop = preprocessing.check_crop(d.crop)
    detector = d.get("detector", "mtcnn") if crop == "detect" else ""
    builder = prepare_once(
        lambda: folder_builder.prepare(
            d.root,
            group_depth=int(d.group_depth),
            data_dir=d.data_dir,
            detector=detector,
            num_workers=int(d.get("prepare_workers", 0)),
        )
    )
    meta = builder.info.metadata
    # Read through a builder restored from the prepared directory (pickles into grain workers
    # without the folder listing), as raw records parsed by parse_record.
    source = tfds.builder_from_directory(builder.data_dir).as_data_source(
        folder_builder.SPLIT, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
    )
    extra = {"root": meta["root"], "skipped_files": int(meta["num_skipped"])}
    if meta["num_skipped"]:
        logging.warning(
            "%s: %d files were skipped at preparation (listed in %s/metadata.json)",
            meta["root"],
            meta["num_skipped"],
            builder.data_dir,
        )
    if detector:
        fallbacks = len(meta["labels"]) - int(meta["num_faces_found"])
        extra["crop_fallbacks"] = fallbacks
        logging.warning(
            "crop=detect (%s): no face found in %d of %d images; they use the center crop",
            detector,
            fallbacks,
            len(meta["labels"]),
        )
    return RecordDataset(
        source,
        labels=np.asarray(meta["labels"]),
        groups=np.asarray(meta["groups"]),
        identity_names=list(meta["identity_names"]),
        group_names=list(meta["group_names"]),
        config=config,
        image_key="image",
        box_key="face_box" if detector else "",
        extra_info=extra,
    )


def _names_and_ids(values: list[Any], feature: Any) -> tuple[np.ndarray, list[str]]:
    """Maps label values (ClassLabel ints, other ints, or text) to dense ints and names."""
    names = getattr(feature, "names", None)
    if names and all(isinstance(v, (int, np.integer)) for v in values):
        return np.asarray(values, np.int64), list(names)
    keys = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    uniq = sorted(set(keys))
    index = {n: i for i, n in enumerate(uniq)}
    return np.asarray([index[k] for k in keys], np.int64), uniq


def create_catalog_dataset(config: ml_collections.ConfigDict) -> RecordDataset:
    """``config.data.source = "tfds"``: a prepared tfds catalog dataset with image + label.

    The dataset must already be prepared in ArrayRecord format under ``config.data.data_dir``
    (preparing most catalog datasets needs TensorFlow and internet; see docs/input.md).
    """
    import tensorflow_datasets as tfds

    d = config.data
    name = d.tfds_name
    if not name:
        raise ValueError("config.data.tfds_name is empty: name a tfds catalog dataset, e.g. 'lfw'")
    if preprocessing.check_crop(d.crop) == "detect":
        raise ValueError(
            "config.data.crop='detect' needs face boxes found at preparation, which only "
            "source=folder does; use crop='center' for tfds catalog datasets"
        )
    image_key = d.get("tfds_image_key", "image")
    label_key = d.get("tfds_label_key", "label")
    group_key = d.get("tfds_group_key", "")
    split = d.get("tfds_split", "train")
    data_dir = d.data_dir or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for unknown / unreadable names.
        raise ValueError(f"config.data.tfds_name: cannot load tfds dataset {name!r}: {e}") from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir}. Prepare it once on a "
            f"machine with TensorFlow and internet: `tfds build {name} --file_format=array_record "
            f"--data_dir=DIR`, then copy DIR here and set config.data.data_dir"
        )
    features = builder.info.features
    for key, field in ((image_key, "tfds_image_key"), (label_key, "tfds_label_key")):
        if key not in features:
            raise ValueError(
                f"config.data.{field}: {name!r} has no feature {key!r}; features: {list(features)}"
            )
    source = tfds.data_source(
        name,
        split=split,
        data_dir=data_dir,
        download=False,
        deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
    )
    keys = (label_key, group_key) if group_key else (label_key,)
    values, group_values = [], []
    for start in range(0, len(source), 1024):
        for raw in _read(source, np.arange(start, min(start + 1024, len(source)))):
            record = parse_record(raw, keys)
            values.append(record[label_key][0])
            group_values.append(record[group_key][0] if group_key else 0)
    labels, identity_names = _names_and_ids(values, features[label_key])
    if group_key:
        groups, group_names = _names_and_ids(group_values, features[group_key])
    else:
        groups, group_names = np.zeros(len(labels), np.int64), ["all"]
    return RecordDataset(
        source,
        labels=labels,
        groups=groups,
        identity_names=identity_names,
        group_names=group_names,
        config=config,
        image_key=image_key,
        extra_info={"tfds_name": name, "tfds_split": split},
    )
