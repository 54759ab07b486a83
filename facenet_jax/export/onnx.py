"""ONNX through the TFLite flatbuffer: jax2tf -> TFLite builtins -> ``tf2onnx`` -> onnxruntime.

    model.onnx: images [batch, S, S, C] float32 -> embeddings [batch, d] float32, opset OPSET

Why this route and not ``jax2onnx`` (checked with JAX 0.10.2 / Flax 0.12.8): every jax2onnx
release since 0.13 pins ``orbax-checkpoint<0.11.37``, which would downgrade this project's
checkpointing (0.12) and break restoring runs; and its Flax Linen ``max_pool`` patch rejects the
positional ``window_shape`` that ``nn.max_pool(x, (2, 2))`` passes (0.12.5 and 0.17.1 alike).
The float32 TFLite model (``tflite.py``) is made of TFLite builtin ops, which ``tf2onnx`` (the
ONNX project's converter) maps to standard ONNX ops; the symbolic batch dimension survives.
The graph's tensors are renamed to ``images`` / ``embeddings``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from facenet_jax.export import tflite
from facenet_jax.export.deps import require

INPUT, OUTPUT = "images", "embeddings"
OPSET = 17  # ONNX 1.12+ / onnxruntime 1.13+.
REQUIRES = (*tflite.REQUIRES[:-1], "tf2onnx", "onnx", "onnxruntime")  # export() and load().


def rename(model, names: dict[str, str]) -> None:
    """Renames graph tensors in place: ``names`` {old: new} over inputs, outputs and nodes."""
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]


def export(fn: Callable, image_shape: tuple[int, int, int], out: str) -> dict[str, Any]:
    """Writes the ONNX model ``out`` (float32, symbolic batch)."""
    onnx = require("onnx", "--format=onnx")
    tf2onnx = require("tf2onnx", "--format=onnx")
    flatbuffer = tflite.convert(fn, image_shape, "none", "--format=onnx")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.tflite")
        with open(path, "wb") as f:
            f.write(flatbuffer)
        model, _ = tf2onnx.convert.from_tflite(path, opset=OPSET)
    (inp,), (outp,) = model.graph.input, model.graph.output
    rename(model, {inp.name: INPUT, outp.name: OUTPUT})
    model.graph.name = "facenet_jax_embedder"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, out)
    return {"route": "jax2tf -> TFLite (builtin ops) -> tf2onnx", "opset": OPSET}


def load(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """The model as images [n, H, W, C] float32 -> [n, d] float32 (onnxruntime, CPU)."""
    ort = require("onnxruntime", "an .onnx model")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda images: np.asarray(
        session.run([OUTPUT], {INPUT: np.asarray(images, np.float32)})[0], np.float32
    )
