"""The parity check every export format passes."""

from __future__ import annotations

import numpy as np


def check_parity(exported, embedder, images: np.ndarray) -> None:
    """Exported and JAX embeddings of the same images agree to 1e-5 (max abs), for batch
    sizes 1 and 7, and the exported rows are unit vectors."""
    want = embedder.embed(images[:7])
    for n in (1, 7):
        got = exported.embed(images[:n])
        assert got.shape == (n, embedder.embedding_dim) and got.dtype == np.float32
        np.testing.assert_allclose(got, want[:n], rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
