"""TF SavedModel export (jax2tf, XlaCallModule): TF's serving signature matches the Flax model."""

import numpy as np
import pytest

from facenet_jax import export
from tests.export.parity import check_parity

tf = pytest.importorskip("tensorflow", reason="the export extra is not installed")


def test_parity_and_signature(embedder, digits, tmp_path):
    images, _ = digits
    out = str(tmp_path / "saved_model")
    contract = export.export_embedder(embedder, "savedmodel", out)
    assert contract["artefact"] == "saved_model" and (tmp_path / "saved_model.json").exists()
    check_parity(export.load(out), embedder, images)

    # TF alone: the serving signature, symbolic batch.
    serve = tf.saved_model.load(out).signatures["serving_default"]
    assert serve.structured_input_signature[1]["images"].shape.as_list() == [None, 16, 16, 1]
    got = serve(images=tf.constant(images[:3]))["embeddings"].numpy()
    np.testing.assert_allclose(got, embedder.embed(images[:3]), rtol=0, atol=1e-5)
