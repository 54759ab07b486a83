"""The one door from images to embeddings: ``Embedder`` (files, folders, zips, dataset splits).

    embedder = inference.load_embedder(workdir)        # a trained run, latest checkpoint
    images = inference.list_images("faces/")           # ROOT/[<group>/]<identity>/<image>
    faces = embedder.embed_set(images, flip=True)      # the ImageSet with embeddings [N, d]
    test = embedder.embed_split(dataset, "test")       # a split of a FaceDataset

An image file reaches the network exactly as a training image does:

    bytes (a file, or a member of a zip archive)
      -> preprocessing.load_image_bytes: the canonical encoding folder preparation stores, the
         face box (crop=detect), crop, resize, scale to [-1, 1]       [S, S, C] float32
      -> zero-padded to a fixed batch size (few compiled shapes)      [B, S, S, C]
      -> the model, BatchNorm running statistics, batch split over the device mesh: [B, d] unit
      -> with flip (test-time augmentation): l2_normalize(f(x) + f(mirror(x))).

Training's own evaluation embeds its splits with the same ``Embedder`` (built from the train
state's variables), so re-evaluating a checkpoint from the CLI gives the run's numbers. Model
variables are rebuilt from ``config.model`` alone (``init_variables``), not from training code.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from facenet_jax import checkpoints, models, parallel
from facenet_jax.data import (
    alignment,
    detection_cache,
    face_detection,
    files,
    preprocessing,
    sampling,
)
from facenet_jax.data.spec import DataSpec
from facenet_jax.labels import IGNORE_LABEL

MIN_BATCH = 8  # Smallest padded batch: embedding 1 or 2 files compiles one small shape.
CHUNK = 1024  # embed_files: files read, detected and decoded together (bounded memory).
LOAD_THREADS = min(4, os.cpu_count() or 1)  # embed_files: decode/crop threads (GIL released).
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ image files


@dataclasses.dataclass
class ImageSet:
    """Labelled images, and once embedded (``Embedder.embed_set`` / ``embed_split``) their
    embeddings: what the evaluation protocols consume.

    Attributes:
      root: where ``files`` lie (a folder, zip, or folder in a zip; None: the files are paths;
        ``<data source>:<split>`` for a dataset split, whose files are ``<split>/<k>``).
      files: [N] file of each image.
      labels: [N] int identity, an index into ``identity_names``.
      groups: [N] int group, an index into ``group_names``.
      embeddings: [N, d] float32 unit rows, None until embedded.
    """

    root: str | None
    files: list[str]
    labels: np.ndarray
    identity_names: list[str]
    groups: np.ndarray
    group_names: list[str]
    embeddings: np.ndarray | None = None

    @property
    def names(self) -> np.ndarray:
        """[N] str identity name of each image."""
        return np.asarray(self.identity_names, dtype=str)[self.labels]

    def subset(self, keep: np.ndarray) -> ImageSet:
        """The images where ``keep`` [N] bool is True (names unchanged)."""
        kept = [f for f, k in zip(self.files, keep, strict=True) if k]
        emb = None if self.embeddings is None else self.embeddings[keep]
        return dataclasses.replace(
            self, files=kept, labels=self.labels[keep], groups=self.groups[keep], embeddings=emb
        )

    def save(self, path: str, fingerprint: str) -> None:
        """An .npz of ``embeddings``, per image ``names``, ``paths`` and ``groups`` (names), and
        the model's ``fingerprint``."""
        np.savez(
            path,
            embeddings=self.embeddings,
            names=self.names,
            paths=np.asarray(self.files, dtype=str),
            groups=np.asarray(self.group_names, dtype=str)[self.groups],
            fingerprint=np.asarray(fingerprint),
        )


def list_images(root: str, group_depth: int = 0, flat_ok: bool = False) -> ImageSet:
    """The image files of ``ROOT/[<group>/]<identity>/<image>`` (a folder, zip, or folder in a zip).

    With ``flat_ok`` a folder of ``ROOT/<name>.<ext>`` files (one photo per person, the name being
    the identity) is accepted when it has no identity sub-folders.
    """
    try:
        tree = files.scan_tree(root, group_depth)
        keep = [k for k, f in enumerate(tree.files) if files.is_image_file(f)]
        if not keep:
            raise ValueError(f"no image files ({', '.join(files.IMAGE_EXTENSIONS)}) under {root}")
        return ImageSet(
            tree.root,
            [tree.files[k] for k in keep],
            np.asarray(tree.identities)[keep],
            list(tree.identity_names),
            np.asarray(tree.groups)[keep],
            list(tree.group_names),
        )
    except ValueError:
        listed = os.listdir(root) if flat_ok and os.path.isdir(root) else []
        flat = sorted(f for f in listed if files.is_image_file(f))
        if not flat:
            raise
        n = len(flat)
        names = [os.path.splitext(f)[0] for f in flat]
        return ImageSet(os.path.abspath(root), flat, np.arange(n), names, np.zeros(n, int), ["all"])


def _try(fn, *args):
    """``fn(*args)``, or the OSError/ValueError it raised (returned, for a worker's caller)."""
    try:
        return fn(*args)
    except (OSError, ValueError) as e:
        return e


def _load_read(job) -> np.ndarray | Exception:
    """``load_bytes`` of (bytes or the read error, spec, name, face box); errors returned."""
    data, spec, name, face_box = job
    return data if isinstance(data, Exception) else _try(load_bytes, data, spec, name, face_box)


def read_bytes(root: str | None, rel: str) -> bytes:
    """The encoded bytes of ``rel`` under ``root`` (a folder, zip, folder in a zip; None: ``rel``
    is a path). Raises OSError naming the file."""
    name = rel if root is None else f"{root}/{rel}"
    try:
        if root is None:
            with open(rel, "rb") as f:
                return f.read()
        return files.read_file(root, rel)
    except OSError as e:
        raise OSError(f"cannot read image file {name}: {e}") from e


def load_file(root: str | None, rel: str, spec: DataSpec) -> np.ndarray:
    """One image file as training sees it: [S, S, C] float32 in [-1, 1].

    ``rel`` lies under ``root`` (a folder, a zip archive or a folder inside one), or is a path when
    ``root`` is None. The bytes go through ``preprocessing.load_image_bytes``, the steps of a
    training record. Raises OSError (unreadable) or ValueError (not an image), naming the file.
    """
    name = rel if root is None else f"{root}/{rel}"
    return preprocessing.load_image_bytes(read_bytes(root, rel), spec, name)


def find_faces(datas: Sequence[bytes], spec: DataSpec, num_workers: int = 0) -> list | None:
    """What crop=detect / crop=align needs of every image, from the content-keyed detection cache,
    the misses found in ``num_workers`` processes (``detection_cache.fill``; 0 = one per core).

    Returns [N] relative face boxes (detect; None: no face or not an image), or None for other
    crops; align fills the landmark cache that ``load_image_bytes`` reads, and returns None.
    """
    if spec.crop == "detect":
        return face_detection.cached_boxes(list(datas), spec.detector, num_workers)
    if spec.crop == "align":
        find = functools.partial(alignment.find_landmarks, spec=spec)
        detection_cache.fill(datas, find, alignment.get_cache(spec.detector), num_workers)
    return None


def load_bytes(data: bytes, spec: DataSpec, name: str, face_box=None) -> np.ndarray:
    """``load_image_bytes`` with crop=detect's ``face_box`` already found (``find_faces``; None:
    no face, the center crop, with the same warning). [S, S, C] float32 in [-1, 1]."""
    if spec.crop != "detect":
        return preprocessing.load_image_bytes(data, spec, name)
    try:
        stored, _ = preprocessing.canonical_encoding(data)
    except ValueError as e:
        raise ValueError(f"image file {name}: {e}") from e
    if face_box is None:
        log.warning("crop=detect: no face found in %s; using the center crop", name)
    return preprocessing.preprocess_image(stored, spec, face_box)


# ------------------------------------------------------------------------------- embedder


@functools.partial(jax.jit, static_argnames=("model", "mesh", "flip"))
def _sharded_embed(variables, images: jax.Array, *, model, mesh, flip: bool) -> jax.Array:
    """images [B, H, W, C] -> [B, d] unit embeddings (BatchNorm running statistics), the batch
    split over ``mesh``; with ``flip``, ``l2_normalize(f(x) + f(mirror(x)))``. Compiled once per
    (model, mesh, flip, shape): every Embedder of a run shares the executables."""

    def embed(variables, x):
        emb = model.apply(variables, x, train=False)
        if flip:
            emb = models.l2_normalize(emb + model.apply(variables, x[:, :, ::-1], train=False))
        return emb

    spec = P(parallel.DATA_AXIS)
    return jax.shard_map(embed, mesh=mesh, in_specs=(P(), spec), out_specs=spec, check_vma=False)(
        variables, images
    )


class Embedder:
    """An embedding network f: images [N, H, W, C] in [-1, 1] -> [N, d] unit vectors.

    Args:
      config: the run's config (``model``, ``data`` and ``eval.batch_size`` are read).
      params, batch_stats: the network's variables.
      step: the training step they come from (0: untrained).
      mesh: devices the batch is split over (default: all devices, ``parallel.create_mesh``).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        params,
        batch_stats,
        step: int,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.config = config
        self.step = int(step)
        self.mesh = parallel.create_mesh() if mesh is None else mesh
        self.spec = DataSpec.from_config(config.data)
        self.batch_size = int(config.eval.batch_size)
        self.model = models.create_model(config.model)
        variables = {"params": params, "batch_stats": batch_stats}
        self.variables = parallel.replicate(variables, self.mesh)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies the exact weights; stored with galleries so a gallery is never used with
        another model: ``<model name>-step<step>-<sha256 of the model config and params>``."""
        digest = hashlib.sha256(self.config.model.to_json(sort_keys=True).encode())
        for leaf in jax.tree.leaves(self.variables["params"]):
            digest.update(np.asarray(leaf, np.float32).tobytes())
        return f"{self.config.model.name}-step{self.step}-{digest.hexdigest()[:16]}"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.spec.image_shape

    @property
    def flip(self) -> bool:
        """The run's test-time mirror averaging (``config.eval.flip``; False for runs older
        than the field): what every ``embed*`` call does when not told ``flip=``."""
        return bool(self.config.eval.get("flip", False))

    def resolve_flip(self, flip: bool | None) -> bool:
        """``flip`` as given, or the run's (``self.flip``) when None: what an ``embed*`` call
        with that ``flip=`` does."""
        return self.flip if flip is None else bool(flip)

    @property
    def embedding_dim(self) -> int:
        return int(self.config.model.embedding_dim)

    def _embed_batch(self, x: np.ndarray, batch_size: int, flip: bool) -> np.ndarray:
        """x [n <= batch_size, H, W, C], the same on every process -> [n, d] float32.

        x is zero-padded to the next power of two (at least MIN_BATCH, at most batch_size),
        rounded up to a multiple of the device count; each process embeds its own rows.
        """
        n, n_dev = len(x), self.mesh.devices.size
        size = -(-min(batch_size, max(MIN_BATCH, 1 << (n - 1).bit_length())) // n_dev) * n_dev
        x = np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])
        rows = sampling.process_slice(size, jax.process_index(), jax.process_count())
        images = parallel.shard_batch({"image": x[rows]}, self.mesh)["image"]
        emb = _sharded_embed(self.variables, images, model=self.model, mesh=self.mesh, flip=flip)
        return np.asarray(parallel.gather_to_host(emb)[:n], np.float32)

    def embed(
        self, images: np.ndarray, batch_size: int | None = None, flip: bool | None = None
    ) -> np.ndarray:
        """images [N, H, W, C] float32 in [-1, 1] -> [N, d] float32 unit vectors.

        ``batch_size`` (default ``config.eval.batch_size``) images per forward pass; ``flip``
        (default the run's, ``self.flip``) adds the mirror image's embedding.
        """
        flip = self.resolve_flip(flip)
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != self.image_shape:
            raise ValueError(
                f"expected images [N, {', '.join(map(str, self.image_shape))}], got {images.shape}"
            )
        b = batch_size or self.batch_size
        out = [self._embed_batch(images[s : s + b], b, flip) for s in range(0, len(images), b)]
        return np.concatenate(out) if out else np.zeros((0, self.embedding_dim), np.float32)

    def data_spec(self, crop: str | None = None) -> DataSpec:
        """The run's data spec, with another ``crop`` if one is given."""
        if crop is None or crop == self.spec.crop:
            return self.spec
        log.warning("crop=%s differs from the run's crop=%s", crop, self.spec.crop)
        return dataclasses.replace(self.spec, crop=crop)

    def embed_files(
        self,
        root: str | None,
        paths: Sequence[str],
        *,
        batch_size: int | None = None,
        flip: bool | None = None,
        crop: str | None = None,
        skip_bad: bool = False,
        progress: bool = False,
        workers: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embeds image files (``load_file``) under ``root``, or paths when root is None.

        Undecodable files raise, or with ``skip_bad`` are skipped with a warning naming each.
        Files go in chunks of ``CHUNK``: read, their faces found (crop=detect/align:
        ``find_faces``, cached per content, misses in ``workers`` processes, 0 = one per core),
        decoded and cropped on ``LOAD_THREADS`` threads, embedded in batches.

        Returns:
          ``(embeddings [n_ok, d] float32, ok [N] bool)``.
        """
        from tqdm.auto import tqdm

        spec = self.data_spec(crop)
        b, flip = batch_size or self.batch_size, self.resolve_flip(flip)
        ok = np.ones(len(paths), bool)
        out = []
        bar = tqdm(
            total=len(paths), desc="embed", unit="img", disable=not progress, file=sys.stderr
        )
        chunk = max(b, CHUNK)
        with concurrent.futures.ThreadPoolExecutor(LOAD_THREADS) as threads:
            for start in range(0, len(paths), chunk):
                ks = range(start, min(start + chunk, len(paths)))
                read = list(
                    threads.map(functools.partial(_try, read_bytes, root), [paths[k] for k in ks])
                )
                good = [k for k, r in zip(ks, read, strict=True) if isinstance(r, bytes)]
                boxes = find_faces([read[k - start] for k in good], spec, workers)
                boxes = iter([None] * len(good) if boxes is None else boxes)
                names = [paths[k] if root is None else f"{root}/{paths[k]}" for k in ks]
                args = [
                    (r, spec, n, next(boxes) if isinstance(r, bytes) else None)
                    for r, n in zip(read, names, strict=True)
                ]
                loaded = list(threads.map(_load_read, args))
                images = []
                for k, x in zip(ks, loaded, strict=True):
                    if isinstance(x, np.ndarray):
                        images.append(x)
                        continue
                    if not skip_bad:
                        raise x
                    ok[k] = False
                    log.warning("skipping %s", x)
                for s in range(0, len(images), b):
                    out.append(self._embed_batch(np.stack(images[s : s + b]), b, flip))
                bar.update(len(ks))
        bar.close()
        if (~ok).any():
            log.warning("skipped %d of %d files that could not be read", (~ok).sum(), len(paths))
        emb = np.concatenate(out) if out else np.zeros((0, self.embedding_dim), np.float32)
        return emb, ok

    def embed_set(self, images: ImageSet, **kwargs) -> ImageSet:
        """``images`` embedded (``embed_files`` options), unreadable files skipped."""
        emb, ok = self.embed_files(images.root, images.files, skip_bad=True, **kwargs)
        return dataclasses.replace(images.subset(ok), embeddings=emb)

    def embed_split(
        self,
        dataset,
        split: str,
        *,
        batch_size: int | None = None,
        flip: bool | None = None,
        progress: bool = False,
    ) -> ImageSet:
        """Embeds every image of a ``FaceDataset`` split once (its padding rows dropped).

        The dataset's evaluation batches hold ``batch_size`` rows (default ``config.eval.
        batch_size``, rounded up to a multiple of the device count); every process reads the
        whole batch and embeds its own rows.
        """
        from tqdm.auto import tqdm

        n_dev, flip = self.mesh.devices.size, self.resolve_flip(flip)
        b = -(-(batch_size or self.batch_size) // n_dev) * n_dev
        info = dataset.split_info(split)  # Unknown split names fail here, naming the valid ones.
        embs, labels, groups = [], [], []
        bar = tqdm(total=info["num_images"], desc=f"embed {split}", disable=not progress)
        for batch in dataset.eval_batches(split, b):
            keep = batch["label"] != IGNORE_LABEL
            emb = self._embed_batch(np.asarray(batch["image"], np.float32), b, flip)
            embs.append(emb[keep])
            labels.append(batch["label"][keep])
            groups.append(batch["group"][keep])
            bar.update(int(keep.sum()))
        bar.close()
        n = sum(len(x) for x in labels)
        root, names, cat = (
            f"{self.config.data.source}:{split}",
            info["identity_names"],
            np.concatenate,
        )
        embedded = (cat(labels), list(names), cat(groups), list(info["group_names"]), cat(embs))
        return ImageSet(root, [f"{split}/{k}" for k in range(n)], *embedded)


# ------------------------------------------------------------------------------ loading runs


def init_variables(
    model_config: ml_collections.ConfigDict, rng: jax.Array, image_shape: tuple[int, int, int]
) -> dict[str, Any]:
    """The model's initial ``{"params", "batch_stats"}`` for images [1, H, W, C] (as training's
    step 0 initialises them with the same ``rng``)."""
    model = models.create_model(model_config)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    return dict(jax.jit(functools.partial(model.init, train=False))(rng, x))


def _init(config: ml_collections.ConfigDict, rng: jax.Array) -> dict[str, Any]:
    d = config.data
    return init_variables(config.model, rng, (d.image_size, d.image_size, d.channels))


def load_embedder(
    workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None
) -> Embedder:
    """The network of a training run at its newest intact checkpoint (or at ``step``)."""
    config = checkpoints.load_config(workdir)
    manager = checkpoints.create_manager(workdir, config)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoint found in {workdir!r}/checkpoints")
        # The restore target, shapes only: the saved tree (optimiser state included, so no
        # optimiser is built here) with the variables as this config's model has them.
        # Damaged metadata in the newest step must not stop the fallback below: read the tree
        # from the newest step whose metadata reads (the requested one when it exists).
        saved = None
        for candidate in [step] if step in steps else steps[::-1]:
            try:
                saved = manager.item_metadata(candidate).tree
                break
            except Exception as err:  # noqa: BLE001 - any damage means "try an older step"
                logging.warning("checkpoint step %d: unreadable metadata (%s)", candidate, err)
        if saved is None:
            saved = manager.item_metadata(steps[-1]).tree  # raises the error that names it
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(saved))
        target.update(jax.eval_shape(lambda: _init(config, jax.random.key(0))))
        restored, step = checkpoints.restore(manager, target, workdir, step, config=config)
    finally:
        manager.close()
    return Embedder(config, restored["params"], restored["batch_stats"], step, mesh)


def run_dataset(config: ml_collections.ConfigDict, root: str | None = None):
    """The ``FaceDataset`` a run was trained and evaluated on (``config.data``, ``config.seed``);
    ``root`` points its folder source elsewhere, e.g. when the images moved."""
    from facenet_jax.data import input_pipeline

    if root:
        config = config.copy_and_resolve_references()
        config.data.root = root
    return input_pipeline.create_dataset(config)


def untrained_embedder(workdir: str, mesh: jax.sharding.Mesh | None = None) -> Embedder:
    """The run's network at initialisation: same config and seed as its step 0, no training.

    This is the untrained baseline that ``eval.json`` reports next to the trained network.
    """
    config = checkpoints.load_config(workdir)
    v = _init(config, jax.random.key(config.seed))
    return Embedder(config, v["params"], v["batch_stats"], 0, mesh)
