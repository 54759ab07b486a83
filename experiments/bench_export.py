"""Exported models next to JAX: file size, CPU latency per image, agreement and accuracy.

    python experiments/bench_export.py --workdir=workdirs/default [--out=DIR]

Exports the run's network to every format (``facenet_jax.export``; TFLite also with float16 and
dynamic-range int8 weights), then on this machine's CPU, for each runtime next to JAX:
  1. the artefact's size;
  2. latency per image: one forward pass on a batch of B preprocessed test images, divided by
     B, for each B in ``--batch_sizes``: the median of ``--repeats`` calls, the best of
     ``--rounds`` rounds (``time_per_image``), and its ratio to JAX's;
  3. max |embedding - JAX's| over the run's test split;
  4. verification on the test split (its unseen identities): accuracy (best threshold) and ROC
     AUC on ``config.eval.num_pairs`` pairs drawn with ``config.seed``, the same pairs for every
     runtime: the accuracy a quantised model loses.
JAX is ``jax.jit`` of the same pure function that is exported (``export.inference_fn``).
Runtimes keep their default thread counts. Prints a markdown table (docs/export.md keeps the
measured one) and the machine load (``os.getloadavg``) before and after.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from facenet_jax import export, inference
from facenet_jax.evaluate import verification

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained run directory.", required=True)
flags.DEFINE_string("out", None, "Where the exported models go (default: a temporary folder).")
flags.DEFINE_list("batch_sizes", ["1", "64"], "Batch sizes B timed (latency per image).")
flags.DEFINE_integer("repeats", 30, "Timed calls in a row per (runtime, batch size, round).")
flags.DEFINE_integer("rounds", 3, "Rounds; the best round's median is kept.")
flags.DEFINE_list(
    "variants",
    ["stablehlo", "onnx", "savedmodel", "tflite", "tflite:float16", "tflite:dynamic_int8"],
    "FORMAT or FORMAT:QUANTIZE to export and measure.",
)

_EXTENSIONS = {"stablehlo": ".stablehlo", "onnx": ".onnx", "savedmodel": "", "tflite": ".tflite"}
_RUNTIMES = {
    "stablehlo": "JAX (jax.export)",
    "onnx": "onnxruntime",
    "savedmodel": "TF",
    "tflite": "LiteRT",
}


def time_per_image(
    forwards: list, images: np.ndarray, batch: int, repeats: int, rounds: int
) -> list[float]:
    """Seconds per image of each ``forward(images[:batch])``: the median of ``repeats`` calls
    in a row (after one warm-up call: compilation / allocation for this shape), the best of
    ``rounds`` rounds, the runtimes' order rotated each round.

    Runtimes are timed one after the other, never interleaved call by call: onnxruntime's and
    TF's thread pools spin for a while after a call, which would slow whatever runs next. The
    best of the rounds discards rounds slowed by other work on a shared machine.
    """
    x = np.ascontiguousarray(images[:batch])
    best = [np.inf] * len(forwards)
    for r in range(rounds):
        for k in np.roll(np.arange(len(forwards)), r):
            np.asarray(forwards[k](x))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                np.asarray(forwards[k](x))
                times.append(time.perf_counter() - start)
            best[k] = min(best[k], float(np.median(times)) / batch)
    return best


def split_images(embedder, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(images [N, S, S, C], labels [N]) of a split of the run's dataset, padding rows dropped."""
    from facenet_jax.labels import IGNORE_LABEL

    dataset = inference.run_dataset(embedder.config)
    images, labels = [], []
    for batch in dataset.eval_batches(split, 256):
        keep = batch["label"] != IGNORE_LABEL
        images.append(np.asarray(batch["image"], np.float32)[keep])
        labels.append(np.asarray(batch["label"])[keep])
    return np.concatenate(images), np.concatenate(labels)


def embed_all(forward, images: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate(
        [np.asarray(forward(images[s : s + batch])) for s in range(0, len(images), batch)]
    )


def main(argv):
    del argv
    load_before = os.getloadavg()
    embedder = inference.load_embedder(FLAGS.workdir)
    config = embedder.config
    images, labels = split_images(embedder)
    i, j, same = verification.sample_pairs(labels, int(config.eval.num_pairs), int(config.seed))
    batches = [int(b) for b in FLAGS.batch_sizes]
    out_dir = FLAGS.out or tempfile.mkdtemp(prefix="bench_export_")
    os.makedirs(out_dir, exist_ok=True)

    jax_fn = jax.jit(export.inference_fn(embedder))
    rows = [("JAX (jax.jit, reference)", "", None, jax_fn)]
    for variant in FLAGS.variants:
        fmt, _, quantize = variant.partition(":")
        quantize = quantize or "none"
        suffix = "" if quantize == "none" else f"_{quantize}"
        path = os.path.join(out_dir, f"model{suffix}{_EXTENSIONS[fmt]}")
        if fmt == "savedmodel":
            path = os.path.join(out_dir, "saved_model")
        start = time.perf_counter()
        c = export.export_embedder(embedder, fmt, path, quantize=quantize)
        print(f"exported {variant} to {path} in {time.perf_counter() - start:.1f} s")
        name = f"{fmt}" + ("" if quantize == "none" else f" ({quantize})")
        forward = export.format_module(fmt).load(path)
        rows.append((f"{name}: {_RUNTIMES[fmt]}", c["artefact_bytes"], c, forward))

    reference = embed_all(jax_fn, images)
    forwards = [row[3] for row in rows]
    ms = [time_per_image(forwards, images, b, FLAGS.repeats, FLAGS.rounds) for b in batches]
    ms = np.array(ms).T * 1e3  # [runtime, batch size]
    header = ["runtime", "file bytes"] + [f"ms/image, B={b} (x JAX)" for b in batches]
    header += ["max abs diff vs JAX", "accuracy", "ROC AUC"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (name, size, _, forward), t in zip(rows, ms, strict=True):
        emb = reference if forward is jax_fn else embed_all(forward, images)
        m = verification.verification_metrics(verification.pair_distances(emb, i, j), same)
        diff = float(np.abs(emb - reference).max())
        cells = [name, f"{size:,}" if size else "-"]
        cells += [f"{t[k]:.3f} ({t[k] / ms[0][k]:.2f})" for k in range(len(batches))]
        cells += [f"{diff:.1e}", f"{m['accuracy']:.4f}", f"{m['auc']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    print(
        f"\n{config.model.name} width {config.model.width}, {embedder.image_shape} input, "
        f"d={embedder.embedding_dim}, step {embedder.step}; test split: {len(images)} images, "
        f"{len(same)} pairs; load average before {load_before[0]:.2f}, after "
        f"{os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
