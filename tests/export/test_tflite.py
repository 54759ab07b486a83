"""TFLite export: LiteRT matches the Flax model in float32; the float16 and dynamic-range int8
variants' verification accuracy on generated pairs is reported next to JAX's."""

import os

import numpy as np
import pytest

from facenet_jax import export
from facenet_jax.evaluate import verification
from tests.export.parity import check_parity

pytest.importorskip("tensorflow", reason="the export extra is not installed")
litert = pytest.importorskip("ai_edge_litert.interpreter", reason="the export extra is missing")


def test_parity_builtin_ops(embedder, digits, tmp_path):
    images, _ = digits
    out = str(tmp_path / "model.tflite")
    contract = export.export_embedder(embedder, "tflite", out)
    assert contract["quantization"] == "none"
    check_parity(export.load(out), embedder, images)

    interpreter = litert.Interpreter(model_path=out)
    inp = interpreter.get_input_details()[0]
    assert list(inp["shape_signature"]) == [-1, 16, 16, 1]  # The symbolic batch.
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert "CONV_2D" in ops and not {o for o in ops if "FLEX" in o or "CUSTOM" in o}


def accuracy(embeddings, labels, num_pairs=2000):
    i, j, same = verification.sample_pairs(labels, num_pairs, seed=0)
    d = verification.pair_distances(embeddings, i, j)
    return verification.best_threshold(d, same)[1]


def test_quantized_accuracy_reported(embedder, digits, tmp_path, capsys):
    images, labels = digits
    want = embedder.embed(images)
    rows = [("jax float32", os.path.getsize, None, want)]
    for quantize in ("none", "float16", "dynamic_int8"):
        out = str(tmp_path / f"model_{quantize}.tflite")
        export.export_embedder(embedder, "tflite", out, quantize=quantize)
        got = export.load(out).embed(images)
        rows.append((f"tflite {quantize}", os.path.getsize(out), np.abs(got - want).max(), got))
    sizes = [r[1] for r in rows[1:]]
    assert sizes[0] > sizes[1] > sizes[2]  # float32 > float16 > int8 weights.
    with capsys.disabled():
        print("\nverification accuracy on 2,000 digit pairs (random-init tiny network)")
        for name, size, err, emb in rows:
            size = "" if err is None else f"{size:>7,} B  max|diff| {err:.1e}"
            print(f"  {name:<22} accuracy {accuracy(emb, labels):.4f}  {size}")
    # Not asserted equal: quantisation moves embeddings, within the loose bound of a sane export.
    assert rows[2][2] < 1e-2 and rows[3][2] < 0.2
