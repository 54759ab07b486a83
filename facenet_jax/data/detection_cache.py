"""What a face detector found in an image, cached per file content, and found in parallel.

crop=detect (a face box) and crop=align (5 landmarks) share this one mechanism:

    encoded bytes -> key = SHA-1(bytes) -> <cache>/<kind>/<detector>-v<version>/<key[:2]>/<key>.json
                                            {"<field>": [...] | null}     (null: no face found)

* Keyed by content, not path: a renamed or copied file hits; an edited file misses.
* Values are fractions of the image (boxes ``(y0, x0, y1, x1) / (H, W)``, landmarks
  ``alignment.to_relative``), so they hold for the image decoded at any JPEG DCT scale.
* Written atomically (temporary file in the same folder, then ``os.replace``): concurrent writers
  (grain workers, detector processes, several runs) never leave a partial entry. An entry that does
  not parse or has the wrong shape is a miss (and is rewritten), never an error. An unwritable
  cache is skipped with one warning; detection still works.
* ``fill`` finds the entries a list of images misses in ``num_workers`` spawned processes (one
  OpenCV thread each: process parallelism beats OpenCV's threads for MTCNN's many small
  forwards, see docs/bench_inference.md) and stores them from the calling process.

The root is ``$FACENET_JAX_CACHE``, else ``$XDG_CACHE_HOME/facenet_jax``, else
``~/.cache/facenet_jax``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Sequence

import numpy as np

CACHE_VERSION = 1  # Bump when stored values change meaning (detector settings, convention).
MIN_PARALLEL = 64  # fill: fewer misses than this are found in-process (spawning costs ~1-2 s).

Finder = Callable[[bytes], "np.ndarray | None"]
_FAILED = "failed"  # fill's worker result for bytes the finder could not read.


def default_cache_dir() -> str:
    """``$FACENET_JAX_CACHE`` or ``$XDG_CACHE_HOME/facenet_jax`` or ``~/.cache/facenet_jax``."""
    root = os.environ.get("FACENET_JAX_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "facenet_jax")
    return root


def content_key(data: bytes) -> str:
    """The cache key of encoded image bytes: their SHA-1, hex."""
    return hashlib.sha1(data).hexdigest()


class DetectionCache:
    """Content key -> float array of ``shape`` (or None: no face), in memory and on disk.

    Args:
      directory: the folder of this kind and detector; one JSON file per image,
        ``<directory>/<key[:2]>/<key>.json`` holding ``{field: list | null}``.
      field: the JSON field (``"box"``, ``"landmarks"``).
      shape: the value's shape ([4] box, [5, 2] landmarks); a stored value of another size is a
        miss.
    """

    def __init__(self, directory: str, field: str, shape: tuple[int, ...]):
        self.directory = directory
        self.field = field
        self.shape = tuple(shape)
        self._memory: dict[str, np.ndarray | None] = {}
        self._warned = False

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, key[:2], key + ".json")

    def get(self, key: str) -> tuple[bool, np.ndarray | None]:
        """``(hit, value or None)``; a missing, unreadable or malformed entry is a miss."""
        if key in self._memory:
            return True, self._memory[key]
        try:
            with open(self._path(key)) as f:
                entry = json.load(f)
            value = entry[self.field]
            if value is not None:
                value = np.asarray(value, np.float64)
                if value.size != int(np.prod(self.shape)) or not np.all(np.isfinite(value)):
                    raise ValueError(f"stored {self.field} has {value.size} finite values")
                value = value.reshape(self.shape)
        except FileNotFoundError:
            return False, None
        except (OSError, ValueError, TypeError, KeyError) as e:
            logging.debug("detection cache: ignoring the bad entry %s (%s)", self._path(key), e)
            return False, None
        self._memory[key] = value
        return True, value

    def put(self, key: str, value: np.ndarray | None) -> None:
        """Stores ``value`` (None: no face) for ``key`` in memory and, atomically, on disk."""
        value = None if value is None else np.asarray(value, np.float64).reshape(self.shape)
        self._memory[key] = value
        folder = os.path.dirname(self._path(key))
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({self.field: None if value is None else value.tolist()}, f)
                os.replace(tmp, self._path(key))
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            if not self._warned:
                self._warned = True
                logging.warning("detection cache %s is not writable (%s)", self.directory, e)


def get_cache(
    kind: str, field: str, shape: tuple[int, ...], detector: str, directory: str | None = None
) -> DetectionCache:
    """The process's cache of ``kind`` ("boxes", "landmarks") for ``detector`` under
    ``directory`` (default ``default_cache_dir()``, read at each call)."""
    root = directory or default_cache_dir()
    return _cache_at(os.path.join(root, kind, f"{detector}-v{CACHE_VERSION}"), field, tuple(shape))


@functools.cache
def _cache_at(folder: str, field: str, shape: tuple[int, ...]) -> DetectionCache:
    return DetectionCache(folder, field, shape)


def cached(data: bytes, find: Callable[[], np.ndarray | None], cache: DetectionCache):
    """The cached value of ``data``; on a miss ``find()`` computes it and it is stored."""
    key = content_key(data)
    hit, value = cache.get(key)
    if hit:
        return value
    value = find()
    cache.put(key, value)
    return cache.get(key)[1]


def _worker_init() -> None:
    """One OpenCV thread per detector process: the processes are the parallelism."""
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass


def _find_one(job: tuple[Finder, bytes]):
    """Worker of ``fill``: the finder's value, or _FAILED when the bytes are not an image."""
    find, data = job
    try:
        return find(data)
    except (OSError, ValueError) as e:
        logging.debug("detection: %s", e)
        return _FAILED


def fill(
    datas: Sequence[bytes],
    find: Finder,
    cache: DetectionCache,
    num_workers: int = 0,
    min_parallel: int | None = None,
) -> list[np.ndarray | None]:
    """The cached values of every image in ``datas``, finding the misses in parallel.

    Args:
      datas: encoded images; duplicates (same content) are found once.
      find: bytes -> value (None: no face); picklable (a module-level function or a
        ``functools.partial`` of one), run in spawned processes. OSError/ValueError (not an image)
        leaves the entry uncached and its value None: the caller's own loading reports the file.
      cache: where values are read and stored (from this process only).
      num_workers: detector processes (0: one per core; 1: in-process). Fewer than
        ``min_parallel`` (default ``MIN_PARALLEL``) misses are found in-process.

    Returns:
      [len(datas)] value or None, as ``find`` gives them.
    """
    keys = [content_key(d) for d in datas]
    missing: dict[str, bytes] = {}
    for key, data in zip(keys, datas, strict=True):
        if key not in missing and not cache.get(key)[0]:
            missing[key] = data
    workers = num_workers or os.cpu_count() or 1
    jobs = [(find, data) for data in missing.values()]
    if workers > 1 and len(jobs) >= (MIN_PARALLEL if min_parallel is None else min_parallel):
        # Spawned, not forked: the caller may hold JAX's threads, which fork would copy broken.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_worker_init
        ) as pool:
            chunk = max(1, min(32, len(jobs) // (4 * workers)))
            found = list(pool.map(_find_one, jobs, chunksize=chunk))
    else:
        found = [_find_one(job) for job in jobs]
    for key, value in zip(missing, found, strict=True):
        if not (isinstance(value, str) and value == _FAILED):
            cache.put(key, value)
    return [cache.get(key)[1] for key in keys]
