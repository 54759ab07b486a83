"""Inference from image files stage by stage: where ``facenet-jax evaluate --crop detect`` goes.

    python experiments/bench_inference.py [--num_images=256] [--config=configs/bfw.py]

Input: ``--num_images`` in-the-wild-like 250x250 JPEG photos made on the fly in a temporary folder
(deleted at exit, never committed): a BFW crop (``../shared/data/bfw``) scaled by U(0.9, 1.6),
rotated by U(-15, 15) degrees and pasted at a random place into a smooth random-colour canvas with
noise. Without BFW the benchmark says so and exits 0.

Rows (images/s; "before" is the path as it was, "after" the current one, in the same run):
  decode       Pillow full decode (``canonical_encoding``, the validation every file gets) vs
               ``cv2.imdecode`` (``preprocessing.decode``, what the crop reads);
  detect       MTCNN serially in this process (OpenCV's own threads) vs ``detection_cache.fill``
               in ``--workers`` spawned processes, one OpenCV thread each (spawn included);
  crop/align   the crop (detect) or the similarity warp (align), face already found: serial vs
               ``inference.LOAD_THREADS`` threads;
  embed        the network alone on preloaded images (``Embedder.embed``, config's batch size);
  e2e cold     files -> embeddings with an empty cache: the old ``embed_files`` loop
               (``load_file`` one by one, then a batch) vs ``Embedder.embed_files``;
  e2e cached   the same files again: nothing cached before (align: landmarks were cached per
               file already, serially) vs the cache filled by the cold run.
Cold rows are one run; the others the best of 3 (least disturbed by other work). The cache
lives in a temporary ``$FACENET_JAX_CACHE``. Prints a markdown table per crop mode;
docs/bench_inference.md keeps the measured one. The network is the config's, untrained (weights
do not change its speed).
"""

from __future__ import annotations

import concurrent.futures
import functools
import glob
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # configs/ imports configs.default.

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/bfw.py", "Configuration (model, data).")
flags.DEFINE_integer("num_images", 256, "Photos to make and embed.")
flags.DEFINE_integer("workers", 0, "Detector processes (0: one per core).")
flags.DEFINE_list("crops", ["detect", "align"], "crop modes to measure.")
flags.DEFINE_string("bfw", "../shared/data/bfw", "BFW root (face crops to paste).")
flags.DEFINE_integer("seed", 0, "Photo generator seed.")


def make_photos(bfw: str, out: str, n: int, seed: int = 0) -> list[str]:
    """``n`` 250x250 JPEG photos ``out/id<k>/<n>.jpg``, each a BFW crop pasted into a canvas."""
    from PIL import Image

    crops = sorted(glob.glob(os.path.join(bfw, "*", "*", "*.jpg")))
    if not crops:
        return []
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        face = Image.open(crops[rng.integers(len(crops))]).convert("RGB")
        colours = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
        canvas = np.asarray(Image.fromarray(colours).resize((250, 250), Image.BICUBIC), float)
        canvas = canvas + rng.normal(0.0, 12.0, canvas.shape)
        photo = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        s = rng.uniform(0.9, 1.6)
        face = face.resize((round(face.width * s), round(face.height * s)), Image.BICUBIC)
        angle = rng.uniform(-15, 15)
        mask = Image.new("L", face.size, 255).rotate(angle, Image.BICUBIC, expand=True)
        face = face.rotate(angle, Image.BICUBIC, expand=True)
        x = int(rng.integers(0, max(1, 250 - face.width + 1)))
        y = int(rng.integers(0, max(1, 250 - face.height + 1)))
        photo.paste(face, (x, y), mask)
        path = os.path.join(out, f"id{k % 64:03d}", f"{k:05d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        photo.save(path, quality=90)
        paths.append(path)
    return paths


def rate(fn, n: int, repeats: int = 1) -> float:
    """Images/s of ``fn()`` handling ``n`` images: the best of ``repeats`` timed runs (the
    least disturbed by other work on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def old_embed_files(embedder, paths, spec) -> np.ndarray:
    """``Embedder.embed_files`` as it was: ``load_file`` one file at a time, then a batch."""
    from facenet_jax import inference

    b, out = embedder.batch_size, []
    for start in range(0, len(paths), b):
        images = [inference.load_file(None, p, spec) for p in paths[start : start + b]]
        out.append(embedder._embed_batch(np.stack(images), b, False))
    return np.concatenate(out)


def bench_crop(crop: str, paths: list[str], config, embedder, cache_root: str) -> list[tuple]:
    import cv2

    from facenet_jax import inference
    from facenet_jax.data import detection_cache, preprocessing

    spec = embedder.data_spec(crop)
    datas = [open(p, "rb").read() for p in paths]
    n, rows = len(paths), []

    def fresh_cache(tag: str) -> None:
        os.environ["FACENET_JAX_CACHE"] = os.path.join(cache_root, f"{crop}-{tag}")
        detection_cache._cache_at.cache_clear()

    pil = rate(lambda: [preprocessing.canonical_encoding(d) for d in datas], n, 3)
    ocv = rate(lambda: [preprocessing.decode(d, 3) for d in datas], n, 3)
    rows.append(("decode (Pillow -> cv2)", pil, ocv))

    threads = cv2.getNumThreads()
    fresh_cache("serial")
    if crop == "detect":
        serial = rate(lambda: [preprocessing.canonical_face(d, spec.detector) for d in datas], n)
    else:
        serial = rate(lambda: [preprocessing.face_landmarks(d, spec) for d in datas], n)
    fresh_cache("parallel")
    parallel = rate(lambda: inference.find_faces(datas, spec, FLAGS.workers), n)
    workers = FLAGS.workers or os.cpu_count()
    label = f"detect (serial, {threads} cv2 threads -> {workers} processes)"
    rows.append((label, serial, parallel))

    boxes = inference.find_faces(datas, spec, FLAGS.workers)  # Cached now.
    boxes = [None] * n if boxes is None else boxes
    jobs = [(d, spec, p, b) for d, p, b in zip(datas, paths, boxes, strict=True)]
    crop_serial = rate(lambda: [inference._load_read(j) for j in jobs], n, 3)
    with concurrent.futures.ThreadPoolExecutor(inference.LOAD_THREADS) as pool:
        crop_threads = rate(lambda: list(pool.map(inference._load_read, jobs)), n, 3)
    stage = "crop" if crop == "detect" else "align warp"
    rows.append((f"{stage} given the face (serial -> threads)", crop_serial, crop_threads))

    images = np.stack([inference._load_read(j) for j in jobs])
    embedder.embed(images[: embedder.batch_size])  # Compile.
    emb = rate(lambda: embedder.embed(images), n, 3)
    rows.append(("embed (network only)", emb, emb))

    fresh_cache("old")
    old_cold = rate(lambda: old_embed_files(embedder, paths, spec), n)
    old_cached = rate(lambda: old_embed_files(embedder, paths, spec), n, 3)
    fresh_cache("new")
    embed = functools.partial(embedder.embed_files, None, paths, workers=FLAGS.workers)
    new_cold = rate(lambda: embed(crop=crop), n)
    new_cached = rate(lambda: embed(crop=crop), n, 3)
    rows.append(("end to end, cold cache", old_cold, new_cold))
    rows.append(("end to end, cached", old_cached, new_cached))
    return rows


def main(argv):
    del argv
    import jax

    from facenet_jax import inference

    config = FLAGS.config
    work = tempfile.mkdtemp(prefix="bench_inference-")
    try:
        paths = make_photos(FLAGS.bfw, os.path.join(work, "photos"), FLAGS.num_images, FLAGS.seed)
        if not paths:
            print(f"no BFW crops under {FLAGS.bfw}: nothing to measure (skipped)")
            return
        v = inference._init(config, jax.random.key(0))
        embedder = inference.Embedder(config, v["params"], v["batch_stats"], 0)
        load = os.getloadavg()
        print(
            f"{len(paths)} photos 250x250, model {config.model.name} "
            f"at {config.data.image_size}px, "
            f"batch {embedder.batch_size}, mirror averaging (config.eval.flip) {embedder.flip}, "
            f"{os.cpu_count()} cores, load average "
            f"{load[0]:.1f} (1 min)"
        )
        for crop in FLAGS.crops:
            rows = bench_crop(crop, paths, config, embedder, os.path.join(work, "cache"))
            print(f"\ncrop={crop}\n\n| stage | before img/s | after img/s | after / before |")
            print("|---|---|---|---|")
            for name, before, after in rows:
                print(f"| {name} | {before:,.1f} | {after:,.1f} | {after / before:.2f} |")
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (1 min)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
