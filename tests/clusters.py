"""Synthetic embeddings for the identification and evaluation tests: noisy clusters of unit rows."""

import math

import numpy as np


def _unit_rows(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clusters(num_ids, per_id, dim=16, noise=0.35, seed=0):
    """Unit embeddings scattered around one random unit centre per identity."""
    rng = np.random.default_rng(seed)
    centres = _unit_rows(rng.normal(size=(num_ids, dim)))
    labels = np.repeat(np.arange(num_ids), per_id)
    e = centres[labels] + rng.normal(scale=noise / math.sqrt(dim), size=(len(labels), dim))
    return _unit_rows(e), labels


def unit(x):
    x = np.asarray(x, float)
    return x / np.linalg.norm(x)
