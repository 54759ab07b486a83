"""Export a trained embedder to other runtimes, its preprocessing contract beside it.

    contract = export.export_run("workdirs/default", "onnx", "exports/model.onnx")
    embedder = export.load("exports/model.onnx")      # an inference.Embedder (onnxruntime)

Formats (``FORMATS``; one module each, ``export(fn, image_shape, out, ...)`` and ``load(path)``):

  stablehlo   jax.export serialisation, symbolic batch; reloads with JAX alone.
  savedmodel  jax2tf (native serialisation) -> TF SavedModel, ``serving_default`` signature.
  tflite      jax2tf -> TFLite converter -> LiteRT interpreter; float32, float16 or
              dynamic-range int8 weights (``quantize``).
  onnx        the float32 TFLite model -> tf2onnx -> onnxruntime.

What is exported is the inference network alone: ``model.apply(variables, x, train=False)``,
BatchNorm with its running statistics, L2-normalised float32 output, the weights as constants;
images [batch, S, S, C] float32 in [-1, 1] with a symbolic batch dimension. The packages of the
non-JAX formats are the optional ``export`` extra (``deps.py``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from facenet_jax.export import contract as contract_lib
from facenet_jax.export import deps
from facenet_jax.export.deps import EXTRA, MissingExtraError, require
from facenet_jax.export.tflite import QUANTIZATIONS

__all__ = [
    "EXTRA",
    "FORMATS",
    "MissingExtraError",
    "QUANTIZATIONS",
    "export_embedder",
    "export_run",
    "format_module",
    "inference_fn",
    "load",
    "require",
]

FORMATS = {
    "stablehlo": "facenet_jax.export.stablehlo",
    "onnx": "facenet_jax.export.onnx",
    "savedmodel": "facenet_jax.export.savedmodel",
    "tflite": "facenet_jax.export.tflite",
}
# Distributions whose versions the contract records, per format.
_VERSIONS = {
    "stablehlo": ("jax", "jaxlib"),
    "savedmodel": ("jax", "tensorflow", "tensorflow-cpu"),
    "tflite": ("jax", "tensorflow", "tensorflow-cpu"),
    "onnx": ("jax", "tensorflow", "tensorflow-cpu", "tf2onnx", "onnx"),
}


def format_module(fmt: str) -> ModuleType:
    """The module of format ``fmt``; ValueError listing the formats when unknown."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; allowed: {list(FORMATS)}")
    return importlib.import_module(FORMATS[fmt])


def inference_fn(embedder) -> Callable[[jax.Array], jax.Array]:
    """The network of an ``inference.Embedder`` as a pure function of the images alone.

    ``f(images [B, H, W, C] float32) -> [B, d] float32``, L2-normalised: ``model.apply`` with
    ``train=False`` (BatchNorm running statistics), the variables closed over as host arrays so
    that every exporter bakes them in as constants.
    """
    variables = jax.tree.map(np.asarray, embedder.variables)
    model = embedder.model

    def fn(images: jax.Array) -> jax.Array:
        return model.apply(variables, images.astype(jnp.float32), train=False).astype(jnp.float32)

    return fn


def export_embedder(
    embedder,
    fmt: str,
    out: str,
    quantize: str = "none",
    threshold: float | None = None,
) -> dict[str, Any]:
    """Exports ``embedder``'s network to ``out`` and writes the contract ``out.json`` beside it.

    Args:
      embedder: an ``inference.Embedder`` (``load_embedder(workdir)``).
      fmt: a key of ``FORMATS``.
      out: the artefact path: a file (onnx, tflite, stablehlo) or a directory (savedmodel).
      quantize: TFLite only: ``"none"``, ``"float16"`` or ``"dynamic_int8"``.
      threshold: the verification threshold to record (squared distance), if known.

    Returns:
      the contract (also written to ``contract.contract_path(out)``).
    """
    module = format_module(fmt)
    if quantize != "none" and fmt != "tflite":
        raise ValueError(f"--quantize={quantize} applies to --format=tflite only, not {fmt}")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    fn = inference_fn(embedder)
    options = {"quantize": quantize} if fmt == "tflite" else {}
    exporter = module.export(fn, embedder.image_shape, out, **options)
    exporter["versions"] = deps.versions(*_VERSIONS[fmt])
    contract = contract_lib.build(embedder, fmt, out, exporter, quantize, threshold)
    contract_lib.write(out, contract)
    return contract


def export_run(
    workdir: str, fmt: str, out: str, step: int | None = None, quantize: str = "none"
) -> dict[str, Any]:
    """``export_embedder`` of a training run's network (latest checkpoint, or ``step``); the
    contract records the run's verification threshold from ``WORKDIR/eval.json`` when present."""
    from facenet_jax import inference
    from facenet_jax.evaluate import report

    for module in format_module(fmt).REQUIRES:  # Unknown formats and a missing extra fail
        require(module, f"--format={fmt}")  # before the run is restored.
    embedder = inference.load_embedder(workdir, step)
    try:
        threshold = report.run_threshold(workdir)
    except ValueError:
        threshold = None
    return export_embedder(embedder, fmt, out, quantize, threshold)


def load(path: str):
    """The exported model at ``path`` as an ``inference.Embedder`` (``ExportedEmbedder``)."""
    from facenet_jax.export import runtime

    return runtime.load(path)
