"""The tfds catalog source, on a tiny catalog-style dataset prepared here (no internet)."""

from __future__ import annotations

import numpy as np
import pytest

from facenet_jax.data import input_pipeline, sampling
from tests.data import trees


def _build_catalog(data_dir: str, dataset_name: str, text_labels: bool):
    """Prepares a tiny catalog-style dataset (PNG image, label, alphabet) in ArrayRecord."""
    import tensorflow_datasets as tfds

    class Builder(tfds.core.GeneratorBasedBuilder):
        name = dataset_name
        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            label = tfds.features.Text() if text_labels else tfds.features.ClassLabel(num_classes=6)
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(12, 12, 1), encoding_format="png"),
                        "label": label,
                        "alphabet": tfds.features.ClassLabel(num_classes=2),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(0)
            for i in range(48):
                img = rng.integers(0, 255, (12, 12), dtype=np.uint8)
                label = f"person{i % 6}" if text_labels else i % 6
                yield i, {"image": trees.encode(img, "PNG"), "label": label, "alphabet": i % 6 // 3}

    builder = Builder(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()


def _config(data_dir: str, **data):
    config = trees.folder_config("", data_dir, **data)
    config.data.source = "tfds"
    return config


@pytest.mark.parametrize("text_labels", [False, True])
def test_catalog_dataset(tmp_path, text_labels):
    name = f"tiny_catalog_{'text' if text_labels else 'class'}"
    _build_catalog(str(tmp_path), name, text_labels)
    config = _config(str(tmp_path), channels=1, val_fraction=0.0, test_fraction=0.34)
    config.data.tfds_name = name
    config.data.tfds_group_key = "alphabet"
    ds = input_pipeline.create_dataset(config)
    assert len(ds.labels) == 48 and len(set(ds.labels.tolist())) == 6
    assert ds.group_names == ["0", "1"]
    if text_labels:
        assert ds.identity_names == [f"person{i}" for i in range(6)]
    assert ds.split_info("test")["num_identities"] == 2
    batches = ds.train_batches(0)
    batch = next(batches)
    batches.close()
    assert batch["image"].shape == (12, 16, 16, 1)
    eval_labels = np.concatenate([b["label"] for b in ds.eval_batches("test", 5)])
    assert (eval_labels != sampling.IGNORE_LABEL).sum() == 16


def test_catalog_errors_are_clear(tmp_path):
    config = _config(str(tmp_path))
    with pytest.raises(ValueError, match="tfds_name is empty"):
        input_pipeline.create_dataset(config)
    config.data.tfds_name = "no_such_dataset_anywhere"
    with pytest.raises(ValueError, match="no_such_dataset_anywhere"):
        input_pipeline.create_dataset(config)
    config.data.tfds_name = "mnist"  # In the catalog, but not prepared in this data_dir.
    with pytest.raises(FileNotFoundError, match="tfds build mnist"):
        input_pipeline.create_dataset(config)
    config.data.crop = "detect"
    with pytest.raises(ValueError, match="crop='detect'"):
        input_pipeline.create_dataset(config)
