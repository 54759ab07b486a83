"""ONNX export (jax2tf -> TFLite -> tf2onnx): onnxruntime matches the Flax model."""

import os

import numpy as np
import pytest

from facenet_jax import export
from tests.export.parity import check_parity

pytest.importorskip("tensorflow", reason="the export extra is not installed")
pytest.importorskip("tf2onnx", reason="the export extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed")
onnx = pytest.importorskip("onnx", reason="the export extra is not installed")


def test_parity(embedder, digits, tmp_path):
    images, _ = digits
    out = str(tmp_path / "model.onnx")
    contract = export.export_embedder(embedder, "onnx", out)
    assert contract["format"] == "onnx" and os.path.getsize(out) == contract["artefact_bytes"]
    check_parity(export.load(out), embedder, images)


def test_plain_onnxruntime(embedder, digits, tmp_path):
    """The file alone, through onnxruntime: named tensors, symbolic batch, standard ONNX ops."""
    images, _ = digits
    out = str(tmp_path / "model.onnx")
    export.export_embedder(embedder, "onnx", out)
    model = onnx.load(out)
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert (inp.name, outp.name) == ("images", "embeddings")
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [16, 16, 1]
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}  # Standard ops only.
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    (got,) = session.run(["embeddings"], {"images": images[:5]})
    np.testing.assert_allclose(got, embedder.embed(images[:5]), rtol=0, atol=1e-5)
