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


@pytest.fixture(scope="module")
def exported(embedder, tmp_path_factory):
    """(path, contract) of the network exported once for this module's tests."""
    out = str(tmp_path_factory.mktemp("onnx") / "model.onnx")
    return out, export.export_embedder(embedder, "onnx", out, threshold=0.5)


def test_parity(exported, embedder, digits):
    images, _ = digits
    out, contract = exported
    assert contract["format"] == "onnx" and os.path.getsize(out) == contract["artefact_bytes"]
    check_parity(export.load(out), embedder, images)


def test_plain_onnxruntime(exported, embedder, digits):
    """The file alone, through onnxruntime: named tensors, symbolic batch, standard ONNX ops."""
    images, _ = digits
    out, _ = exported
    model = onnx.load(out)
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert (inp.name, outp.name) == ("images", "embeddings")
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [16, 16, 1]
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}  # Standard ops only.
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    (got,) = session.run(["embeddings"], {"images": images[:5]})
    np.testing.assert_allclose(got, embedder.embed(images[:5]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("flip", [False, True])
def test_plain_python_example_in_docs(exported, digits, tmp_path, monkeypatch, flip):
    """docs/export.md's example (onnxruntime, NumPy and Pillow only) on two 16x16 PNGs gives
    the package's embeddings of the same files, with and without the contract's mirror
    averaging (``test_time_flip``)."""
    import json
    import shutil

    from PIL import Image

    images, _ = digits
    for name in ("model.onnx", "model.onnx.json"):
        shutil.copy(os.path.join(os.path.dirname(exported[0]), name), tmp_path / name)
    with open(tmp_path / "model.onnx.json") as f:
        contract = json.load(f)
    contract["output"]["test_time_flip"] = flip
    with open(tmp_path / "model.onnx.json", "w") as f:
        json.dump(contract, f)
    for name, x in (("a.png", images[0]), ("b.png", images[25])):
        Image.fromarray(((x[:, :, 0] + 1) * 127.5).round().astype(np.uint8)).save(tmp_path / name)
    docs = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "export.md")
    with open(docs) as f:
        text = f.read()
    section = text[text.index("## Using the ONNX model from plain Python") :]
    start = section.index("```python\n") + 10
    code = section[start : section.index("\n```", start)]
    # The "10-line example" plus the 3 lines of mirror averaging: lines of code (ruff's
    # formatter adds blank lines around `def`).
    assert len([line for line in code.splitlines() if line.strip()]) <= 14
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "docs/export.md", "exec"), namespace)
    want, _ = export.load("model.onnx").embed_files(None, ["a.png", "b.png"], flip=flip)
    np.testing.assert_allclose(namespace["emb"], want, rtol=0, atol=1e-5)
    assert namespace["d"] == pytest.approx(float(np.sum((want[0] - want[1]) ** 2)), abs=1e-5)
