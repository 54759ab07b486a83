"""StableHLO export: reloads with jax.export alone (no model code) and matches the Flax model."""

import json
import os

import jax
import numpy as np
import pytest

from facenet_jax import export
from tests.export.parity import check_parity

pytest.importorskip("flatbuffers", reason="the export extra is not installed")


def test_parity_and_symbolic_batch(embedder, digits, tmp_path):
    images, _ = digits
    out = str(tmp_path / "model.stablehlo")
    contract = export.export_embedder(embedder, "stablehlo", out)
    assert os.path.getsize(out) == contract["artefact_bytes"]
    check_parity(export.load(out), embedder, images)

    # No project code: jax.export alone, the batch dimension symbolic.
    with open(out, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    assert str(exported.in_avals[0].shape[0]) == "batch"
    assert exported.in_avals[0].shape[1:] == (16, 16, 1)
    assert set(exported.platforms) == {"cpu", "cuda", "tpu"}
    got = np.asarray(exported.call(images[:3]))
    np.testing.assert_allclose(got, embedder.embed(images[:3]), rtol=0, atol=1e-5)
    with open(out + ".json") as f:
        assert json.load(f) == contract
