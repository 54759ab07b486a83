"""The preprocessing contract: a small JSON written next to every exported model.

An exported network is only correct on images prepared exactly as in training. The contract
says how, for a user without this package, and lets ``runtime.ExportedEmbedder`` rebuild the
same preprocessing (``DataSpec``) from the run's config:

    ARTEFACT.json = {
      "format": "onnx" | "savedmodel" | "tflite" | "stablehlo", "artefact": file name,
      "fingerprint": the run's Embedder.fingerprint (model config + weights), "step": ...,
      "input":  {"name": "images", "layout": "NHWC", "shape": [null, S, S, C], "dtype":
                 "float32", "value_range": [-1, 1], "scaling": "x = pixel / 255 * 2 - 1",
                 "color", "crop", "resize", ...},
      "output": {"name": "embeddings", "shape": [null, d], "l2_normalised": true,
                 "distance": ..., "threshold": the run's verification threshold or null,
                 "test_time_flip": the run's config.eval.flip, "test_time_flip_means"},
      "quantization", "exporter": {route, versions}, "config": the run's whole config,
    }

``null`` in a shape is the symbolic batch dimension: any batch size >= 1.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import ml_collections

VERSION = 1
REQUIRED = ("version", "format", "artefact", "fingerprint", "input", "output", "config")

_COLOR = {1: "grey: one channel, ITU-R 601 luma (Pillow 'L')", 3: "RGB, channels last"}
_CROP = {
    "none": "the whole image",
    "center": "the central square of side center_crop_fraction * min(H, W)",
    "detect": "the square of side max(h, w) * (1 + detect_margin) around the face box of "
    "`detector`; the center crop when no face is found",
    "align": "a similarity warp of the face's 5 landmarks (`detector`) onto the ArcFace template, "
    "enlarged by align_margin (facenet_jax.data.alignment); the center crop when no face is found",
}


def contract_path(artefact: str) -> str:
    """Where the contract of ``artefact`` lies: ``ARTEFACT.json`` (``model.onnx.json``)."""
    return os.path.normpath(artefact) + ".json"


def artefact_digest(path: str) -> tuple[int, str]:
    """(bytes, sha256 hex) of a file, or of a directory's files in sorted relative-path order."""
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    digest, size = hashlib.sha256(), 0
    for name in files:
        digest.update(os.path.relpath(name, path).encode() if name != path else b"")
        with open(name, "rb") as f:
            data = f.read()
        size += len(data)
        digest.update(data)
    return size, digest.hexdigest()


def build(
    embedder,
    fmt: str,
    artefact: str,
    exporter: dict[str, Any],
    quantization: str = "none",
    threshold: float | None = None,
) -> dict[str, Any]:
    """The contract of ``artefact``, exported from ``embedder`` (an ``inference.Embedder``)."""
    spec, config = embedder.spec, embedder.config
    size, sha = artefact_digest(artefact)
    crop = {"crop": spec.crop, "crop_means": _CROP.get(spec.crop, "see data/preprocessing.py")}
    if spec.crop != "none":
        crop["center_crop_fraction"] = spec.center_crop_fraction
    if spec.crop in ("detect", "align"):
        crop["detector"] = spec.detector
        margin = f"{spec.crop}_margin"  # detect_margin / align_margin
        if hasattr(spec, margin):
            crop[margin] = getattr(spec, margin)
    return {
        "version": VERSION,
        "format": fmt,
        "artefact": os.path.basename(os.path.normpath(artefact)),
        "artefact_bytes": size,
        "artefact_sha256": sha,
        "fingerprint": embedder.fingerprint,
        "step": int(embedder.step),
        "model": config.model.name,
        "input": {
            "name": "images",
            "layout": "NHWC",
            "shape": [None, *spec.image_shape],
            "dtype": "float32",
            "batch": "symbolic: any batch size >= 1",
            "channels": spec.channels,
            "color": _COLOR[spec.channels],
            "value_range": [-1.0, 1.0],
            "scaling": "x = pixel / 255 * 2 - 1 (uint8 pixels)",
            **crop,
            "resize": f"crop box -> {spec.image_size}x{spec.image_size}: area averaging when "
            "shrinking, bilinear when enlarging (OpenCV INTER_AREA / INTER_LINEAR)",
            "decode": "EXIF orientation ignored; large JPEGs decoded at 1/2^n scale (libjpeg) "
            "while the crop stays >= image_size",
            "reference": "facenet_jax.data.preprocessing.load_image",
        },
        "output": {
            "name": "embeddings",
            "shape": [None, int(config.model.embedding_dim)],
            "dtype": "float32",
            "l2_normalised": True,
            "distance": "squared Euclidean ||a - b||^2 in [0, 4]; same person iff <= threshold",
            "threshold": threshold,
            # config.eval.flip: the run embeds (and measured its threshold) with mirror averaging.
            "test_time_flip": embedder.flip,
            "test_time_flip_means": "embedding = l2_normalize(f(x) + f(x[:, :, ::-1])) when true "
            "(x mirrored left-right, NHWC); f(x) alone when false",
        },
        "quantization": quantization,
        "exporter": exporter,
        "config": json.loads(config.to_json()),
    }


def write(artefact: str, contract: dict[str, Any]) -> str:
    """Writes ``contract`` to ``contract_path(artefact)`` (atomically); returns that path."""
    from facenet_jax.evaluate import report

    return report.write_json(contract_path(artefact), contract)


def read(artefact: str) -> dict[str, Any]:
    """The contract of an exported model; ``artefact`` may also be the contract JSON itself.

    Raises FileNotFoundError naming the expected JSON, ValueError naming what is missing.
    """
    path = artefact if artefact.endswith(".json") else contract_path(artefact)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no export contract {path!r} next to {artefact!r}: an exported model is used "
            "through the JSON that `facenet-jax export` writes next to it"
        )
    with open(path) as f:
        try:
            contract = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    missing = [k for k in REQUIRED if k not in contract]
    if missing:
        raise ValueError(f"{path}: export contract lacks field(s) {missing}")
    if contract["version"] != VERSION:
        raise ValueError(
            f"{path}: contract version {contract['version']}, this package reads {VERSION}"
        )
    return contract


def run_config(contract: dict[str, Any]) -> ml_collections.ConfigDict:
    """The exported run's config, as ``checkpoints.load_config`` would give it."""
    return ml_collections.ConfigDict(contract["config"])


def describe(contract: dict[str, Any], path: str) -> str:
    """The lines ``facenet-jax export`` prints: where the model is and how to feed it."""
    inp, out = contract["input"], contract["output"]
    shape = "x".join("N" if s is None else str(s) for s in inp["shape"])
    crop = inp["crop"] + (f" ({inp['crop_means']})" if inp["crop"] != "none" else "")
    lines = [
        f"{contract['format']}: {path} ({contract['artefact_bytes']:,} bytes"
        + (f", {contract['quantization']}" if contract["quantization"] != "none" else "")
        + ")",
        f"  contract:    {contract_path(path)}",
        f"  fingerprint: {contract['fingerprint']}",
        f"  input:  {inp['name']} [{shape}] {inp['dtype']} {inp['layout']}, {inp['color']}, "
        f"values in [-1, 1] ({inp['scaling']})",
        f"  crop:   {crop}; resize {inp['resize']}",
        f"  output: {out['name']} [N, {out['shape'][1]}] float32, L2-normalised; threshold "
        f"{out['threshold']} on the squared distance",
    ]
    if out.get("test_time_flip"):
        lines.append(f"  flip:   {out['test_time_flip_means']} (the threshold assumes it)")
    return "\n".join(lines)
