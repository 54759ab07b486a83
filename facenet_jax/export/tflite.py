"""TFLite (LiteRT) flatbuffers: the jax2tf module through the TFLite converter, run by LiteRT.

    f_tf   = savedmodel.tf_module(f)                  # XlaCallModule, symbolic batch
    model  = TFLiteConverter.from_concrete_functions([f_tf.serve]).convert()
    inputs : [batch, S, S, C] float32 (shape signature [-1, S, S, C]; resized per call)

The converter lowers the StableHLO to TFLite builtin ops (CONV_2D, MAX_POOL_2D,
FULLY_CONNECTED, ...), so the model runs in the plain LiteRT interpreter (``ai-edge-litert``),
no TF ops needed. Quantisation variants (weights only; activations stay float32):

  none          float32 weights; agrees with JAX to ~1e-6.
  float16       weights stored as float16, dequantised at load: half the size.
  dynamic_int8  dynamic-range quantisation: int8 weights with per-channel scales, activations
                quantised on the fly where a kernel supports it: a quarter of the size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from facenet_jax.export import savedmodel
from facenet_jax.export.deps import require

QUANTIZATIONS = ("none", "float16", "dynamic_int8")
REQUIRES = (*savedmodel.REQUIRES, "ai_edge_litert.interpreter")  # export() and load() import.


def convert(
    fn: Callable, image_shape: tuple[int, int, int], quantize: str = "none", purpose: str = ""
) -> bytes:
    """The TFLite flatbuffer of ``fn`` (images [batch, H, W, C] -> [batch, d])."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown TFLite quantisation {quantize!r}; allowed: {QUANTIZATIONS}")
    purpose = purpose or "--format=tflite"
    tf = require("tensorflow", purpose)
    module = savedmodel.tf_module(fn, image_shape, purpose)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module
    )
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def export(
    fn: Callable, image_shape: tuple[int, int, int], out: str, quantize: str = "none"
) -> dict[str, Any]:
    """Writes the ``.tflite`` flatbuffer ``out``."""
    with open(out, "wb") as f:
        f.write(convert(fn, image_shape, quantize))
    return {
        "route": "jax2tf (XlaCallModule) -> TFLiteConverter (TFLite builtin ops)",
        "quantization": quantize,
    }


class _Runner:
    """A LiteRT interpreter called on batches; the input is resized when the batch size changes."""

    def __init__(self, path: str):
        litert = require("ai_edge_litert.interpreter", "a .tflite model")
        self.interpreter = litert.Interpreter(model_path=path)
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]
        self.shape = None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images, np.float32)
        if x.shape != self.shape:
            self.interpreter.resize_tensor_input(self.input, x.shape, strict=True)
            self.interpreter.allocate_tensors()
            self.shape = x.shape
        self.interpreter.set_tensor(self.input, x)
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self.output), np.float32)


def load(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """The flatbuffer as images [n, H, W, C] float32 -> [n, d] float32 (LiteRT interpreter)."""
    return _Runner(path)
