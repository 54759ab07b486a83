"""An exported model as an embedder: ``load(path)`` -> ``ExportedEmbedder``.

``ExportedEmbedder`` is an ``inference.Embedder`` whose forward pass is the exported artefact
(onnxruntime, TF, LiteRT or a deserialised ``jax.export`` module) instead of the Flax model:
files, folders, zips and dataset splits reach it through the same ``embed_files`` /
``embed_set`` / ``embed_split`` code, with the preprocessing rebuilt from the contract's run
config. So ``verify``, ``evaluate`` and the rest of the CLI work with ``--model=PATH`` and the
parity with JAX is testable end to end.
"""

from __future__ import annotations

import os

import numpy as np

from facenet_jax import inference, models, parallel
from facenet_jax.data.spec import DataSpec
from facenet_jax.export import contract as contract_lib


class ExportedEmbedder(inference.Embedder):
    """images [N, H, W, C] float32 in [-1, 1] -> [N, d] float32 unit rows, via an exported model.

    Args:
      path: the artefact (``model.onnx``, ``model.tflite``, a SavedModel directory, ...) with its
        contract ``PATH.json`` beside it.
    """

    def __init__(self, path: str):
        from facenet_jax import export  # The format table; export imports this module lazily.

        self.path = path
        self.contract = contract_lib.read(path)
        self.format = self.contract["format"]
        self.config = contract_lib.run_config(self.contract)
        self.step = int(self.contract.get("step", 0))
        self.spec = DataSpec.from_config(self.config.data)
        self.batch_size = int(self.config.eval.batch_size)
        self.mesh = parallel.create_mesh()  # Only its device count is read (embed_split).
        self.model = self.variables = None  # No Flax model: the artefact is the network.
        self.fingerprint = self.contract["fingerprint"]  # Shadows the cached property.
        artefact = os.path.join(os.path.dirname(os.path.normpath(path)), self.contract["artefact"])
        if not os.path.exists(artefact):
            raise FileNotFoundError(f"exported model {artefact!r} (named by its contract) missing")
        self._forward = export.format_module(self.format).load(artefact)

    @property
    def threshold(self) -> float | None:
        """The run's verification threshold (squared distance) recorded at export, if any."""
        return self.contract["output"].get("threshold")

    def _embed_batch(self, x: np.ndarray, batch_size: int, flip: bool) -> np.ndarray:
        """x [n, H, W, C] -> [n, d] float32; with ``flip``, l2_normalize(f(x) + f(mirror(x)))."""
        emb = self._forward(x)
        if flip:
            emb = np.asarray(models.l2_normalize(emb + self._forward(x[:, :, ::-1])))
        return np.asarray(emb, np.float32)


def load(path: str) -> ExportedEmbedder:
    """The exported model at ``path`` (its format read from the contract beside it)."""
    return ExportedEmbedder(path)
