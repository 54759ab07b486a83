"""Fixtures of the export tests: a tiny network (smoke config: small_cnn width 8, 16x16 grey,
d = 16) with non-trivial BatchNorm statistics, and preprocessed digit images."""

from __future__ import annotations

import jax
import numpy as np
import pytest


@pytest.fixture(scope="session")
def embedder(smoke_config):
    """An ``inference.Embedder`` at initialisation, running statistics moved off (0, 1) so that
    an exporter that dropped or mis-applied BatchNorm's inference mode would show."""
    from facenet_jax import inference

    config = smoke_config
    v = inference.init_variables(config.model, jax.random.key(0), (16, 16, 1))
    rng = np.random.default_rng(0)
    stats = {
        layer: {
            "mean": rng.uniform(-0.05, 0.05, s["mean"].shape).astype(np.float32),
            "var": rng.uniform(0.5, 2.0, s["var"].shape).astype(np.float32),
        }
        for layer, s in v["batch_stats"].items()
    }
    return inference.Embedder(config, v["params"], stats, step=0)


@pytest.fixture(scope="session")
def digits():
    """(images [200, 16, 16, 1] float32 in [-1, 1], labels [200]): 20 of each scikit-learn digit,
    upsampled 2x, scaled as preprocessing scales pixels."""
    from sklearn.datasets import load_digits

    from facenet_jax.data import preprocessing

    d = load_digits()
    keep = np.concatenate([np.flatnonzero(d.target == k)[:20] for k in range(10)])
    x = np.kron(d.images[keep], np.ones((2, 2)))[..., None]  # [200, 16, 16, 1] in [0, 16]
    return preprocessing.to_unit_range(x, 16.0), d.target[keep]
