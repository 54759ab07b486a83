"""Fixtures shared by the data tests: one image tree with bad files, prepared once per session."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.data import trees


@pytest.fixture(scope="session")
def tree(tmp_path_factory):
    """(root, {good rel: identity}, {bad rel: reason word}, tfds data_dir)."""
    root = str(tmp_path_factory.mktemp("faces"))
    good = trees.make_tree(root)
    bad = trees.add_bad_files(root)
    # An identity left with one good image: excluded from training, kept as a distractor.
    os.makedirs(os.path.join(root, "g1/id99"))
    with open(os.path.join(root, "g1/id99/only.png"), "wb") as f:
        f.write(trees.encode(trees.face(np.random.default_rng(9), 99, False, 20, 20), "PNG"))
    with open(os.path.join(root, "g1/id99/broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8 nope")
    bad["g1/id99/broken.jpg"] = "decodable"
    good["g1/id99/only.png"] = "g1/id99"
    return root, good, bad, str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def folder_dataset(tree):
    """The folder source over ``tree`` with ``trees.folder_config``."""
    from facenet_jax.data import input_pipeline

    root, _, _, data_dir = tree
    return input_pipeline.create_dataset(trees.folder_config(root, data_dir))
