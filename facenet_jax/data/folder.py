"""The folder source: a tree of face images, prepared once into a tfds ArrayRecord dataset.

Layout: ``ROOT/<identity>/<image>``, or ``ROOT/<group>/<identity>/<image>`` with
``group_depth=1`` (``group_depth`` levels of group folders); ROOT may be a zip archive or a folder
inside one (listing and reading: ``files.py``).

Preparation (``prepare``) decodes every file once, in ``prepare_workers`` processes:

* JPEG and PNG files already in L or RGB mode are stored byte for byte (nothing is lost, and
  the stored data does not depend on the training input size, so changing ``image_size`` or the
  crop never re-prepares); anything else Pillow decodes (PGM, GIF, BMP, TIFF, 16-bit or palette
  PNG, CMYK JPEG, ...) is re-encoded as PNG in L or RGB, so reading needs JPEG/PNG only.
* A file that cannot be read or decoded (corrupt, truncated, zero bytes, not an image) or that
  sits at the wrong depth is skipped with a warning naming it; so is what the listing never reads
  (named pipes, sockets, devices, names that are not UTF-8, links to folders listed already:
  ``files.py``). A summary counts them, and the identity folders holding no file.
* One process prepares a given folder at a time (a lock file beside the prepared data, released
  by the system when its holder dies); it first removes the ``incomplete.*`` directory that a
  preparation killed midway (SIGKILL, power loss) left behind. An exception inside preparation
  leaves nothing (tfds removes its temporary directory).
* With a detector (crop=detect), the face box is found once here and stored as a feature
  (fractions of the image; -1 when no face was found: the center crop is used then, and counted).
  crop=align stores nothing: ``create_folder_dataset`` fills the landmark cache
  (``alignment.survey_landmarks``) and counts the images without a face.

Features: ``image`` (encoded bytes), ``label`` (ClassLabel over identity names), ``identity``
(``[<group>/]<identity>``), ``path`` (relative to ROOT), ``group``, ``face_box`` [4] float32.
Everything lives in one split, ``full``, in file order; ``create_folder_dataset`` splits it by
identity (``splits.py``) and reads it with the shared reader (``records.RecordDataset``). The
prepared data sits in ``DATA_DIR/face_folder/<root name>_<hash>/1.0.0``: the hash covers
FORMAT_VERSION, the root path, every file's relative path, size and mtime, ``group_depth`` and the
detector, so a changed folder is prepared again and an unchanged one is read straight away.
Reading needs no TensorFlow.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import functools
import glob
import hashlib
import logging
import multiprocessing
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

from facenet_jax.data import alignment, files, preprocessing, records, splits
from facenet_jax.data.spec import DataSpec

FORMAT_VERSION = "1"  # Bump when what is stored changes: every folder is then prepared again.
SPLIT = "full"
_PARALLEL_MIN_FILES = 2000  # Below this a process pool costs more than it saves.


def inspect_image(data: bytes, detector: str = "") -> dict[str, Any]:
    """Decodes encoded bytes fully and returns what is stored for them.

    Returns ``{"image": bytes, "face_box": [4] float32}``: the bytes from
    ``preprocessing.canonical_encoding`` (the original JPEG/PNG, or a PNG re-encoding) and the
    face box as fractions (y0, x0, y1, x1) of the image, all -1 when no detector ran or no face was
    found. Raises ValueError describing why the bytes are not a usable image.
    """
    stored, found = preprocessing.canonical_face(data, detector)
    box = np.full(4, -1.0, np.float32) if found is None else np.asarray(found, np.float32)
    return {"image": stored, "face_box": box}


def _inspect_file(job: tuple[str, str, str]) -> tuple[dict[str, Any] | None, str]:
    """Worker: (root, rel, detector) -> (stored features or None, reason it was skipped)."""
    root, rel, detector = job
    try:
        data = files.read_file(root, rel)
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    try:
        return inspect_image(data, detector), ""
    except ValueError as e:
        return None, str(e)


def _import_tfds():
    import tensorflow_datasets as tfds

    return tfds


def _make_builder_class():
    """Defined lazily so importing this module does not import tensorflow_datasets."""
    tfds = _import_tfds()

    class FaceFolder(tfds.core.GeneratorBasedBuilder):
        """A folder of identity-labelled face images (see facenet_jax/data/folder.py)."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Images, identity labels, paths, groups and face boxes."}
        # No checksums file beside the code: without this, tfds 4.9 looks for one through the
        # `importlib_resources` backport, which it does not install on Python >= 3.9.
        code_path = None

        def __init__(
            self, *, listing: files.TreeListing, detector: str = "", num_workers: int = 0, **kw
        ):
            self.listing = listing
            self.detector = detector
            self.num_workers = num_workers
            super().__init__(
                config=tfds.core.BuilderConfig(name=config_name(listing, detector)), **kw
            )

        def _info(self):
            features = tfds.features
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Face images of {self.listing.root} "
                f"(group_depth={self.listing.group_depth}, detector={self.detector or 'none'}).",
                features=features.FeaturesDict(
                    {
                        "image": features.Image(shape=(None, None, 3), encoding_format=None),
                        "label": features.ClassLabel(names=list(self.listing.identity_names)),
                        "identity": features.Text(),
                        "path": features.Text(),
                        "group": features.Text(),
                        "face_box": features.Tensor(shape=(4,), dtype=np.float32),
                    }
                ),
                disable_shuffling=True,  # Records stay in sorted file order.
                metadata=tfds.core.MetadataDict(),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {SPLIT: self._generate_examples()}

        def _generate_examples(self):
            yield from _generate(self.listing, self.detector, self.num_workers, self.info.metadata)

    return FaceFolder


@functools.cache
def builder_class():
    """The tfds builder class ``face_folder`` (created on first use)."""
    return _make_builder_class()


def config_name(listing: files.TreeListing, detector: str) -> str:
    """``<root name>_<12 hex of the hash of FORMAT_VERSION, the listing and the detector>``."""
    base = os.path.basename(listing.root.rstrip(os.sep)) or "root"
    slug = re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_")[:40] or "root"
    # "+pad": crop=detect's boxes come with the padded retry (face_detection.detect_relative);
    # folders prepared before it are prepared again rather than read with their old fallbacks.
    key = f"{FORMAT_VERSION}\n{listing.signature}\n{detector + '+pad' if detector else ''}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return f"{slug}_{digest}"


def _generate(
    listing: files.TreeListing, detector: str, num_workers: int, metadata: dict[str, Any]
):
    """Yields (key, example) in file order, skipping bad files; fills ``metadata``."""
    jobs = [(listing.root, rel, detector) for rel in listing.files]
    workers = num_workers or os.cpu_count() or 1
    expected = "not at ROOT/" + "<group>/" * listing.group_depth + "<identity>/<image>"
    skipped = sorted([(rel, expected) for rel in listing.misplaced] + list(listing.skipped))
    for rel, reason in skipped:
        logging.warning("skipping %s: %s", os.path.join(listing.root, rel), reason)
    empty = list(listing.empty_identities)
    if empty:
        logging.warning(
            "%d identity folders hold no file: %s%s",
            len(empty),
            ", ".join(empty[:10]),
            " ..." if len(empty) > 10 else "",
        )
    labels, groups, found = [], [], 0
    pool = None
    if workers > 1 and len(jobs) >= _PARALLEL_MIN_FILES:
        # Spawned, not forked: the caller may hold JAX's threads, which fork would copy broken.
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn")
        )
        results = pool.map(_inspect_file, jobs, chunksize=64)
    else:
        results = map(_inspect_file, jobs)
    try:
        for i, (example, reason) in enumerate(results):
            rel = listing.files[i]
            if example is None:
                logging.warning("skipping %s: %s", os.path.join(listing.root, rel), reason)
                skipped.append((rel, reason))
                continue
            label, group = listing.identities[i], listing.groups[i]
            labels.append(label)
            groups.append(group)
            found += bool(example["face_box"][0] >= 0)
            example.update(
                label=label,
                identity=listing.identity_names[label],
                path=rel,
                group=listing.group_names[group],
            )
            yield i, example
    except concurrent.futures.process.BrokenProcessPool as e:
        raise RuntimeError(
            "a preparation worker process died; a script that prepares data must guard its entry "
            "point with `if __name__ == '__main__':` (workers are spawned), or set "
            "config.data.prepare_workers=1"
        ) from e
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if not labels:
        raise ValueError(f"none of the {len(jobs)} files under {listing.root} is a decodable image")
    metadata.update(
        root=listing.root,
        group_depth=listing.group_depth,
        detector=detector,
        identity_names=list(listing.identity_names),
        group_names=list(listing.group_names),
        labels=labels,
        groups=groups,
        num_skipped=len(skipped),
        skipped=[list(s) for s in skipped],
        empty_identities=empty,
        num_faces_found=found if detector else 0,
    )
    logging.log(
        logging.WARNING if skipped else logging.INFO,
        "prepared %s: %d images of %d identities, %d files skipped, %d empty identity folders%s",
        listing.root,
        len(labels),
        len(set(labels)),
        len(skipped),
        len(empty),
        f", {detector} found a face in {found} ({len(labels) - found} center-crop fallbacks)"
        if detector
        else "",
    )


def prepare(
    root: str,
    *,
    group_depth: int = 0,
    data_dir: str = "",
    detector: str = "",
    num_workers: int = 0,
):
    """Prepares ``root`` (skipped when this content is already prepared) and returns the builder.

    Args:
      root: ``config.data.root``.
      group_depth: group folder levels above the identity folders.
      data_dir: where tfds data lives ("" = ~/tensorflow_datasets).
      detector: face detector run once per image ("" = none), see face_detection.DETECTORS.
      num_workers: preparation processes (0 = one per CPU core).

    Returns:
      A tfds builder; ``builder.as_data_source("full")`` reads it, ``builder.info.metadata`` holds
      labels, groups, names and the skipped-file report.
    """
    listing = files.scan_tree(root, group_depth)
    data_dir = os.path.expanduser(data_dir or os.path.join("~", "tensorflow_datasets"))
    builder = builder_class()(
        listing=listing,
        detector=detector,
        num_workers=num_workers,
        data_dir=data_dir,
        file_format="array_record",
    )
    if not builder.is_prepared():
        with _preparing(builder.data_dir):
            logging.info("preparing %s into %s", listing.root, builder.data_dir)
            builder.download_and_prepare()  # Returns at once if another process just did.
    return builder


@contextlib.contextmanager
def _preparing(version_dir: str):
    """Holds ``<config dir>/.prepare.lock`` and removes stale ``incomplete.*`` directories.

    tfds writes ``<config dir>/incomplete.<random>_1.0.0`` and renames it to ``1.0.0`` at the end;
    a process killed before the rename leaves it. The lock (``flock``, dropped by the system when
    the holder dies) guarantees that no live process is writing one, so all of them are stale.
    """
    config_dir = os.path.dirname(os.path.normpath(version_dir))
    os.makedirs(config_dir, exist_ok=True)
    with open(os.path.join(config_dir, ".prepare.lock"), "a") as lock:
        try:
            import fcntl
        except ImportError:  # Not POSIX: no lock, and no cleaning (it could be another's).
            yield
            return
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for stale in sorted(glob.glob(os.path.join(config_dir, "incomplete.*"))):
                logging.warning("removing %s, left by a preparation that was killed", stale)
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_feasible(spec: DataSpec, eval_split: str) -> None:
    """Before preparing ``spec.root``: ``splits.check_listing`` on the files it lists.

    Raises ValueError naming the config fields to change when no outcome of decoding can give the
    train split P drawable identities or ``eval_split`` a same and a different pair; a missing
    root, a root that is a file and a tree without files at identity depth raise as in ``prepare``.
    """
    listing = files.scan_tree(spec.root, spec.group_depth)
    splits.check_listing(
        listing.identities, listing.groups, spec, eval_split, files.display_name(listing.root)
    )


def prepare_once(prepare: Callable[[], Any]) -> Any:
    """Runs ``prepare`` on process 0 first, then (after a barrier) on the other processes.

    In a multi-host run every process builds the dataset; preparing concurrently would have
    several processes write the same tfds directory. Process 0 prepares alone; the others then
    find the data prepared (shared ``data_dir``) and only read it, or prepare their own copy
    (host-local ``data_dir``). Single-process runs just call ``prepare``.
    """
    import jax  # Not at module level: grain workers import this module and need no JAX.
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return prepare()

    result = prepare() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("facenet_jax.data.folder.prepare")
    return prepare() if result is None else result


def create_folder_dataset(spec: DataSpec, seed: int) -> records.RecordDataset:
    """``source = "folder"``: prepares ``spec.root`` once, splits it by identity, reads it."""
    import tensorflow_datasets as tfds

    detector = spec.detector if spec.crop == "detect" else ""
    builder = prepare_once(
        lambda: prepare(
            spec.root,
            group_depth=spec.group_depth,
            data_dir=spec.data_dir,
            detector=detector,
            num_workers=spec.prepare_workers,
        )
    )
    meta = builder.info.metadata
    # Read through a builder restored from the prepared directory (pickles into grain workers
    # without the folder listing), as raw records parsed by records.parse_record.
    source = tfds.builder_from_directory(builder.data_dir).as_data_source(
        SPLIT, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
    )
    extra = {"root": meta["root"], "skipped_files": int(meta["num_skipped"])}
    if meta["num_skipped"]:
        logging.warning(
            "%s: %d files were skipped at preparation (listed in %s/metadata.json)",
            meta["root"],
            meta["num_skipped"],
            builder.data_dir,
        )
    if detector:
        fallbacks = len(meta["labels"]) - int(meta["num_faces_found"])
        extra["crop_fallbacks"] = fallbacks
        logging.warning(
            "crop=detect (%s): no face found in %d of %d images; they use the center crop",
            detector,
            fallbacks,
            len(meta["labels"]),
        )
    if spec.crop == "align":
        find = functools.partial(preprocessing.face_landmarks, spec=spec)
        named = _named_images(source)
        no_face = alignment.survey_landmarks(named, find, spec.detector, spec.prepare_workers)
        extra["crop_fallbacks"] = len(no_face)
    labels, groups = np.asarray(meta["labels"]), np.asarray(meta["groups"])
    return records.RecordDataset(
        source,
        records.TfdsDecoder("image", "face_box" if detector else "", spec),
        labels=labels,
        groups=groups,
        identity_names=list(meta["identity_names"]),
        group_names=list(meta["group_names"]),
        splits=splits.split_for_spec(labels, groups, spec),
        spec=spec,
        seed=seed,
        extra_info=extra,
    )


def _named_images(source, chunk: int = 1024):
    """Yields (path, encoded bytes) of every prepared record, reading ``chunk`` at a time."""
    for start in range(0, len(source), chunk):
        for raw in records.read(source, np.arange(start, min(start + chunk, len(source)))):
            record = records.parse_record(raw, ("path", "image"))
            yield record["path"][0].decode(), record["image"][0]
