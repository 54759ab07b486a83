"""TF SavedModel through ``jax2tf``: the network as one ``XlaCallModule`` op (native StableHLO).

    f_tf = jax2tf.convert(f, polymorphic_shapes=["(batch, ...)"], with_gradient=False)
    serving_default(images: [None, S, S, C] float32) -> {"embeddings": [None, d] float32}

jax2tf still ships with JAX 0.10 (``jax.experimental.jax2tf``), in native serialisation only:
TensorFlow runs the StableHLO of ``jax.export`` inside an ``XlaCallModule`` op, so TF (2.21, the
pairing tested here) executes exactly the module that the ``stablehlo`` format writes. The TFLite
converter lowers that op to TFLite builtins (``tflite.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from facenet_jax.export.deps import require

INPUT, OUTPUT = "images", "embeddings"  # The serving signature's tensor names.
PLATFORMS = ("cpu",)  # XlaCallModule platforms: TF on CPU, and what TFLite converts.
REQUIRES = ("tensorflow", "jax.experimental.jax2tf")  # Modules export() and load() import.


def tf_module(fn: Callable, image_shape: tuple[int, int, int], purpose: str):
    """A ``tf.Module`` whose ``serve`` is the converted ``fn`` with a symbolic batch dimension."""
    tf = require("tensorflow", purpose)
    jax2tf = require("jax.experimental.jax2tf", purpose)
    converted = jax2tf.convert(
        fn,
        polymorphic_shapes=["(batch, ...)"],
        with_gradient=False,
        native_serialization_platforms=PLATFORMS,
    )
    module = tf.Module()
    module.serve = tf.function(
        lambda images: {OUTPUT: converted(images)},
        autograph=False,
        input_signature=[tf.TensorSpec((None, *image_shape), tf.float32, name=INPUT)],
    )
    return module


def export(fn: Callable, image_shape: tuple[int, int, int], out: str) -> dict[str, Any]:
    """Writes the SavedModel directory ``out`` with the ``serving_default`` signature."""
    tf = require("tensorflow", "--format=savedmodel")
    module = tf_module(fn, image_shape, "--format=savedmodel")
    tf.saved_model.save(module, out, signatures={"serving_default": module.serve})
    return {
        "route": "jax2tf (native serialisation: XlaCallModule) -> tf.saved_model",
        "platforms": list(PLATFORMS),
        "signature": "serving_default",
    }


def load(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """The SavedModel's ``serving_default`` as images [n, H, W, C] -> [n, d] float32 (TF)."""
    tf = require("tensorflow", "a SavedModel")
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]

    def run(images: np.ndarray) -> np.ndarray:
        out = serve(**{INPUT: tf.constant(np.asarray(images, np.float32))})
        return np.asarray(out[OUTPUT].numpy(), np.float32)

    run.loaded = loaded  # Keeps the restored objects alive while the function is used.
    return run
