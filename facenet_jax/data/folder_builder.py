"""Turns a folder of face images into a tfds ArrayRecord dataset, once.

Layout: ``ROOT/<identity>/<image>``, or ``ROOT/<group>/<identity>/<image>`` with
``group_depth=1`` (``group_depth`` levels of group folders). ROOT may also be a zip archive, or a
folder inside one: ``omniglot/images_background.zip/images_background``.

Preparation (``prepare``) decodes every file once, in ``num_workers`` processes:

* JPEG and PNG files already in L or RGB mode are stored byte for byte (nothing is lost, and
  the stored data does not depend on the training input size, so changing ``image_size`` or the
  crop never re-prepares); anything else Pillow decodes (PGM, GIF, BMP, TIFF, 16-bit or palette
  PNG, CMYK JPEG, ...) is re-encoded as PNG in L or RGB, so reading needs JPEG/PNG only.
* A file that cannot be read or decoded (corrupt, truncated, zero bytes, not an image) or that
  sits at the wrong depth is skipped with a warning naming it; a summary counts them.
* With a detector (crop=detect), the face box is found once here and stored as a feature
  (fractions of the image; -1 when no face was found: the center crop is used then, and counted).

Features: ``image`` (encoded bytes), ``label`` (ClassLabel over identity names), ``identity``
(``[<group>/]<identity>``), ``path`` (relative to ROOT), ``group``, ``face_box`` [4] float32.
Everything lives in one split, ``full``, in file order; the identity-disjoint train/val/test
splits are computed on top of it by ``folder_dataset``. The prepared data sits in
``DATA_DIR/face_folder/<root name>_<content hash>/1.0.0``: the hash covers the root path, every
file's relative path, size and mtime, ``group_depth`` and the detector, so a changed folder is
prepared again and an unchanged one is read straight away. Reading needs no TensorFlow.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import dataclasses
import functools
import hashlib
import logging
import multiprocessing
import os
import re
import zipfile
from typing import Any

import numpy as np

FORMAT_VERSION = "1"  # Bump when what is stored changes: every folder is then prepared again.
SPLIT = "full"
_PARALLEL_MIN_FILES = 2000  # Below this a process pool costs more than it saves.


@dataclasses.dataclass(frozen=True)
class TreeListing:
    """The candidate image files of a tree, in sorted order, and their identities and groups."""

    root: str  # Absolute path of the folder, zip, or "archive.zip/inner/folder".
    group_depth: int
    files: tuple[str, ...]  # Paths relative to root, "/"-separated.
    identities: tuple[int, ...]  # Per file: index into identity_names.
    groups: tuple[int, ...]  # Per file: index into group_names.
    identity_names: tuple[str, ...]  # "<group>/<identity>" (or "<identity>"), sorted.
    group_names: tuple[str, ...]  # Sorted group folder names; ("all",) when group_depth == 0.
    misplaced: tuple[str, ...]  # Files not at ROOT/<group>*/<identity>/<file> depth.
    signature: str  # sha1 over the root, group_depth and every file's path, size and mtime.


def _split_zip(root: str) -> tuple[str, str] | None:
    """("path/archive.zip", "inner/prefix") when root is, or lies inside, a zip file."""
    parts = root.split(os.sep)
    for i in range(len(parts), 0, -1):
        head = os.sep.join(parts[:i]) or os.sep
        if head.lower().endswith(".zip") and os.path.isfile(head):
            return head, "/".join(p for p in parts[i:] if p)
    return None


def resolve_root(root: str) -> str:
    """Absolute path of ``config.data.root``; a relative path is tried from the working directory,
    then from the repository root (so ``../shared/data/bfw`` works from anywhere)."""
    if not root:
        raise ValueError("config.data.root is empty: set it to a folder ROOT/<identity>/<image>")
    expanded = os.path.expanduser(root)
    candidates = [os.path.abspath(expanded)]
    if not os.path.isabs(expanded):
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        candidates.append(os.path.normpath(os.path.join(repo, expanded)))
    for path in candidates:
        if os.path.isdir(path) or _split_zip(path) is not None:
            return path
    raise FileNotFoundError(
        f"config.data.root: image folder {root!r} does not exist (tried {candidates}); point "
        "--config.data.root at a folder laid out as ROOT/[<group>/]<identity>/<image>"
    )


def _walk(root: str) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file under root (a folder, zip or zip folder)."""
    zipped = _split_zip(root)
    if zipped is None:
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                    size, mtime = st.st_size, st.st_mtime_ns
                except OSError:
                    size, mtime = -1, -1  # Unreadable: inspected (and reported) later.
                rel = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
                out.append((rel, size, mtime))
        return sorted(out)
    archive, prefix = zipped
    prefix = f"{prefix}/" if prefix else ""
    with zipfile.ZipFile(archive) as zf:
        return sorted(
            (info.filename[len(prefix) :], info.file_size, info.CRC)
            for info in zf.infolist()
            if not info.is_dir() and info.filename.startswith(prefix)
        )


def scan_tree(root: str, group_depth: int = 0) -> TreeListing:
    """Lists ``ROOT/<group>*group_depth/<identity>/<file>``; raises if there is no such file."""
    if group_depth < 0:
        raise ValueError(f"config.data.group_depth must be >= 0, got {group_depth}")
    root = resolve_root(root)
    entries = _walk(root)
    depth = group_depth + 2
    files, misplaced = [], []
    for rel, _, _ in entries:
        parts = rel.split("/")
        hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
        if hidden:
            continue  # .DS_Store, ._AppleDouble and friends are not data.
        (files if len(parts) == depth else misplaced).append(rel)
    if not files:
        raise ValueError(
            f"no image files found in {root} at depth ROOT/{'<group>/' * group_depth}"
            f"<identity>/<image> ({len(misplaced)} files elsewhere); check config.data.root "
            "and config.data.group_depth"
        )
    identity_of = ["/".join(f.split("/")[:-1]) for f in files]
    group_of = ["/".join(f.split("/")[:group_depth]) or "all" for f in files]
    identity_names = sorted(set(identity_of))
    group_names = sorted(set(group_of))
    id_index = {n: i for i, n in enumerate(identity_names)}
    group_index = {n: i for i, n in enumerate(group_names)}
    h = hashlib.sha1(f"{FORMAT_VERSION}\n{root}\n{group_depth}\n".encode())
    for rel, size, mtime in entries:
        h.update(f"{rel}\t{size}\t{mtime}\n".encode())
    return TreeListing(
        root=root,
        group_depth=group_depth,
        files=tuple(files),
        identities=tuple(id_index[n] for n in identity_of),
        groups=tuple(group_index[n] for n in group_of),
        identity_names=tuple(identity_names),
        group_names=tuple(group_names),
        misplaced=tuple(misplaced),
        signature=h.hexdigest(),
    )


@functools.lru_cache(maxsize=4)
def _zip_handle(archive: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(archive)


def read_file(root: str, rel: str) -> bytes:
    """The bytes of ``rel`` under root (a folder or a zip); OSError when it cannot be read."""
    zipped = _split_zip(root)
    if zipped is None:
        with open(os.path.join(root, *rel.split("/")), "rb") as f:
            return f.read()
    archive, prefix = zipped
    try:
        return _zip_handle(archive).read(f"{prefix}/{rel}" if prefix else rel)
    except (KeyError, zipfile.BadZipFile) as e:
        raise OSError(str(e)) from e


def inspect_image(data: bytes, detector: str = "") -> dict[str, Any]:
    """Decodes encoded bytes fully and returns what is stored for them.

    Returns ``{"image": bytes, "face_box": [4] float32}``: the bytes from
    ``preprocessing.canonical_encoding`` (the original JPEG/PNG, or a PNG re-encoding) and the
    face box as fractions (y0, x0, y1, x1) of the image, all -1 when no detector ran or no face was
    found. Raises ValueError describing why the bytes are not a usable image.
    """
    from facenet_jax.data import face_detection, preprocessing

    stored, image = preprocessing.canonical_encoding(data)
    box = np.full(4, -1.0, np.float32)
    if detector:
        found = face_detection.detect_relative(np.asarray(image), detector)
        if found is not None:
            box = np.asarray(found, np.float32)
    return {"image": stored, "face_box": box}


def _inspect_file(job: tuple[str, str, str]) -> tuple[dict[str, Any] | None, str]:
    """Worker: (root, rel, detector) -> (stored features or None, reason it was skipped)."""
    root, rel, detector = job
    try:
        data = read_file(root, rel)
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
        """A folder of identity-labelled face images (see facenet_jax/folder_builder.py)."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Images, identity labels, paths, groups and face boxes."}
        # No checksums file beside the code: without this, tfds 4.9 looks for one through the
        # `importlib_resources` backport, which it does not install on Python >= 3.9.
        code_path = None

        def __init__(self, *, listing: TreeListing, detector: str = "", num_workers: int = 0, **kw):
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


def config_name(listing: TreeListing, detector: str) -> str:
    """``<root name>_<12 hex of the content hash>`` (detector included in the hash)."""
    base = os.path.basename(listing.root.rstrip(os.sep)) or "root"
    slug = re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_")[:40] or "root"
    digest = hashlib.sha1(f"{listing.signature}\n{detector}".encode()).hexdigest()[:12]
    return f"{slug}_{digest}"


def _generate(listing: TreeListing, detector: str, num_workers: int, metadata: dict[str, Any]):
    """Yields (key, example) in file order, skipping bad files; fills ``metadata``."""
    jobs = [(listing.root, rel, detector) for rel in listing.files]
    workers = num_workers or os.cpu_count() or 1
    expected = "not at ROOT/" + "<group>/" * listing.group_depth + "<identity>/<image>"
    skipped = [(rel, expected) for rel in listing.misplaced]
    for rel, reason in skipped:
        logging.warning("skipping %s: %s", os.path.join(listing.root, rel), reason)
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
        num_faces_found=found if detector else 0,
    )
    logging.log(
        logging.WARNING if skipped else logging.INFO,
        "prepared %s: %d images of %d identities, %d files skipped%s",
        listing.root,
        len(labels),
        len(set(labels)),
        len(skipped),
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
    listing = scan_tree(root, group_depth)
    data_dir = os.path.expanduser(data_dir or os.path.join("~", "tensorflow_datasets"))
    builder = builder_class()(
        listing=listing,
        detector=detector,
        num_workers=num_workers,
        data_dir=data_dir,
        file_format="array_record",
    )
    if not builder.is_prepared():
        logging.info("preparing %s into %s", listing.root, builder.data_dir)
        builder.download_and_prepare()
    return builder
