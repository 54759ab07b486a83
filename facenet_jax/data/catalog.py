"""The tfds catalog source: a prepared tfds dataset with an image and an identity label.

``create_catalog_dataset`` reads ``spec.tfds_name`` (split(s) ``spec.tfds_split``) from
``spec.data_dir`` with ``tfds.data_source`` as raw records (no TensorFlow at run time), maps its
label (ClassLabel, integer or text) and optional group feature to dense ints, splits it by
identity or image like a folder (``splits.py``), and reads it with the shared reader
(``records.RecordDataset``). The dataset must already be prepared in ArrayRecord format; preparing
most catalog datasets needs TensorFlow and internet (see docs/input.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from facenet_jax.data import records, splits
from facenet_jax.data.spec import DataSpec


def _names_and_ids(values: list[Any], feature: Any) -> tuple[np.ndarray, list[str]]:
    """Maps label values (ClassLabel ints, other ints, or text) to dense ints and names."""
    names = getattr(feature, "names", None)
    if names and all(isinstance(v, (int, np.integer)) for v in values):
        return np.asarray(values, np.int64), list(names)
    keys = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    uniq = sorted(set(keys))
    index = {n: i for i, n in enumerate(uniq)}
    return np.asarray([index[k] for k in keys], np.int64), uniq


def create_catalog_dataset(spec: DataSpec, seed: int) -> records.RecordDataset:
    """``source = "tfds"``: the prepared catalog dataset ``spec.tfds_name``, split and read."""
    import tensorflow_datasets as tfds

    name = spec.tfds_name
    if not name:
        raise ValueError("config.data.tfds_name is empty: name a tfds catalog dataset, e.g. 'lfw'")
    if spec.crop == "detect":
        raise ValueError(
            "config.data.crop='detect' needs face boxes found at preparation, which only "
            "source=folder does; use crop='center' for tfds catalog datasets"
        )
    image_key, label_key, group_key = spec.tfds_image_key, spec.tfds_label_key, spec.tfds_group_key
    data_dir = spec.data_dir or None
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
        split=spec.tfds_split,
        data_dir=data_dir,
        download=False,
        deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
    )
    keys = (label_key, group_key) if group_key else (label_key,)
    values, group_values = [], []
    for start in range(0, len(source), 1024):
        indices = np.arange(start, min(start + 1024, len(source)))
        for raw in records.read(source, indices):
            record = records.parse_record(raw, keys)
            values.append(record[label_key][0])
            group_values.append(record[group_key][0] if group_key else 0)
    labels, identity_names = _names_and_ids(values, features[label_key])
    if group_key:
        groups, group_names = _names_and_ids(group_values, features[group_key])
    else:
        groups, group_names = np.zeros(len(labels), np.int64), ["all"]
    return records.RecordDataset(
        source,
        records.TfdsDecoder(image_key, "", spec),
        labels=labels,
        groups=groups,
        identity_names=identity_names,
        group_names=group_names,
        splits=splits.split_for_spec(labels, groups, spec),
        spec=spec,
        seed=seed,
        extra_info={"tfds_name": name, "tfds_split": spec.tfds_split},
    )
