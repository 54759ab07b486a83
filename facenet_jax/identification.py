"""One-shot, open-set identification: enrol a gallery, identify probes or reject them as unknown.

A gallery holds one template per enrolled person: the mean of the person's L2-normalised
embeddings, re-normalised, ``t_k = normalize(mean_i normalize(f(x_ki)))``. A probe x is
identified as ``k* = argmin_k ||f(x) - t_k||^2`` and accepted iff that squared distance is
``<= threshold``; otherwise it is "unknown".

The threshold is calibrated for a target false-accept rate on a labelled validation set whose
identities are disjoint from the gallery's: FAR(t) is the fraction of impostor comparisons (two
images of different people) with ``d <= t``, and the threshold is the largest one with
``FAR(t) <= target``. Against a gallery of K people a stranger is accepted when any template is
that close, about ``1 - (1 - FAR)^K`` of strangers; ``calibrate_fpir`` instead sets the threshold
for a target false-positive identification rate (FPIR) of this gallery, on the nearest-template
distances of stranger images.

The protocols built on this module live in ``facenet_jax.evaluate``: ``open_set`` (calibrate,
enrol, identify and reject on a labelled set) and ``episodes`` (N-way K-shot classification).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import zipfile
from collections.abc import Sequence

import numpy as np

from facenet_jax.evaluate import verification
from facenet_jax.labels import IGNORE_LABEL
from facenet_jax.models.layers import l2_normalize

UNKNOWN = "unknown"  # Name given to rejected probes.


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of x [..., D] scaled to unit norm: ``models.l2_normalize`` (the network's own
    normalisation) as a float32 NumPy array."""
    return np.asarray(l2_normalize(np.asarray(x, np.float32)))


# ------------------------------------------------------------------------------- gallery


@dataclasses.dataclass
class Gallery:
    """Enrolled templates.

    Attributes:
      embeddings: [K, D] float32 unit templates, one per person.
      names: the K names.
      fingerprint: the embedding model's fingerprint; a gallery is only valid with that model.
      threshold: accept iff squared distance <= threshold (inf: never reject).
      target_far: the FAR the threshold was calibrated for (nan if not calibrated).
    """

    embeddings: np.ndarray
    names: list[str]
    fingerprint: str = ""
    threshold: float = math.inf
    target_far: float = math.nan

    def save(self, path: str) -> None:
        """Writes an .npz atomically (temporary file in the same folder, then ``os.replace``)."""
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".gallery-", suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    embeddings=np.asarray(self.embeddings, np.float32),
                    names=np.asarray(self.names, dtype=str),
                    fingerprint=np.asarray(self.fingerprint, dtype=str),
                    threshold=np.float64(self.threshold),
                    target_far=np.float64(self.target_far),
                )
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str) -> Gallery:
        """Reads and validates a gallery written by ``save``.

        Raises:
          ValueError naming ``path`` when the file is not a gallery: not a readable .npz (random
          bytes, truncated, empty; pickled objects are never loaded), missing or mis-typed
          entries, embeddings not [K, D] float with D >= 1, K names for K rows, duplicate names,
          non-finite or non-unit templates, a negative or NaN threshold. The model fingerprint
          is checked against the embedding model by ``check_fingerprint``.
          FileNotFoundError when it does not exist.
        """
        if not os.path.exists(path):
            raise FileNotFoundError(f"gallery {path}: no such file")
        if os.path.isdir(path):
            raise ValueError(f"gallery {path}: is a folder, not a gallery .npz")
        try:
            with np.load(path, allow_pickle=False) as z:
                files = set(z.files)
                missing = {"embeddings", "names", "fingerprint", "threshold"} - files
                if missing:
                    raise ValueError(f"not a gallery file, missing {sorted(missing)}")
                raw = {k: z[k] for k in files & {*_GALLERY_KEYS}}
        except ValueError as e:
            raise ValueError(f"gallery {path}: {_load_error(e)}") from e
        except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise ValueError(
                f"gallery {path}: unreadable ({type(e).__name__}: {e}); re-enrol it"
            ) from e
        try:
            return cls._validated(raw)
        except ValueError as e:
            raise ValueError(f"gallery {path}: {e}; re-enrol it") from e

    @classmethod
    def _validated(cls, raw: dict[str, np.ndarray]) -> Gallery:
        """A Gallery from the arrays of a gallery file, each checked (ValueError says which)."""
        emb, names = raw["embeddings"], raw["names"]
        if emb.ndim != 2 or emb.shape[1] < 1 or emb.shape[0] < 1:
            raise ValueError(f"embeddings must be [K, D] with K, D >= 1, got shape {emb.shape}")
        if emb.dtype.kind != "f":
            raise ValueError(f"embeddings must be float, got {emb.dtype}")
        if names.ndim != 1 or names.dtype.kind != "U":
            raise ValueError(f"names must be a 1-D string array, got {names.dtype} {names.shape}")
        if len(names) != len(emb):
            raise ValueError(f"{len(emb)} embeddings but {len(names)} names")
        if len(set(names.tolist())) != len(names):
            raise ValueError("duplicate names")
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        if len(bad):
            raise ValueError(f"{len(bad)} non-finite templates (first: {str(names[bad[0]])!r})")
        norms = np.linalg.norm(emb.astype(np.float64), axis=1)
        off = np.flatnonzero(np.abs(norms - 1.0) > 1e-3)
        if len(off):
            raise ValueError(
                f"templates must have unit norm; {str(names[off[0]])!r} has {norms[off[0]]:.4g}"
            )
        scalars = {}
        for key in ("fingerprint", "threshold", "target_far"):
            if key in raw and raw[key].shape != ():
                raise ValueError(f"{key} must be a scalar, got shape {raw[key].shape}")
        if raw["fingerprint"].dtype.kind != "U":
            raise ValueError(f"fingerprint must be a string, got {raw['fingerprint'].dtype}")
        for key in ("threshold", "target_far"):
            if key in raw:
                if raw[key].dtype.kind not in "fiu":
                    raise ValueError(f"{key} must be a number, got {raw[key].dtype}")
                scalars[key] = float(raw[key])
        if math.isnan(scalars["threshold"]) or scalars["threshold"] < 0:
            raise ValueError(f"threshold must be >= 0 (or inf), got {scalars['threshold']}")
        return cls(
            embeddings=emb.astype(np.float32),
            names=[str(n) for n in names],
            fingerprint=str(raw["fingerprint"]),
            threshold=scalars["threshold"],
            target_far=scalars.get("target_far", math.nan),
        )

    def check_fingerprint(self, fingerprint: str, path: str = "") -> None:
        """Raises ValueError (naming ``path``) if the gallery was enrolled with another model."""
        if fingerprint != self.fingerprint:
            enrolled = f"model {self.fingerprint!r}" if self.fingerprint else "an unknown model"
            raise ValueError(
                f"gallery {path + ' ' if path else ''}was enrolled with {enrolled}, not "
                f"{fingerprint!r}; re-enrol it with this model"
            )


_GALLERY_KEYS = ("embeddings", "names", "fingerprint", "threshold", "target_far")


def _load_error(e: ValueError) -> str:
    """NumPy's message for a file it cannot read, without its advice to unpickle it."""
    if "pickle" in str(e):
        return "not a gallery .npz (unreadable as NumPy arrays; pickled data is never loaded)"
    return str(e)


def enrol(
    embeddings: np.ndarray,
    names: Sequence[str],
    fingerprint: str = "",
    threshold: float = math.inf,
    target_far: float = math.nan,
) -> Gallery:
    """Templates from embeddings [N, D] and the person name of each row (sorted by name)."""
    e = unit_rows(embeddings)
    names = np.asarray(names, dtype=str)
    if len(names) != len(e) or len(e) == 0:
        raise ValueError(f"need one name per embedding row, got {len(names)} names, {len(e)} rows")
    uniq, inverse = np.unique(names, return_inverse=True)
    sums = np.zeros((len(uniq), e.shape[1]), np.float64)
    np.add.at(sums, inverse, e)
    return Gallery(unit_rows(sums), [str(u) for u in uniq], fingerprint, threshold, target_far)


@dataclasses.dataclass
class Identification:
    """Result of identifying M probes.

    Attributes:
      names: [M] the identified name, or ``UNKNOWN`` when rejected.
      nearest: [M] int index of the nearest template (regardless of the threshold).
      distance: [M] float squared distance to it.
      accepted: [M] bool, ``distance <= threshold``.
    """

    names: list[str]
    nearest: np.ndarray
    distance: np.ndarray
    accepted: np.ndarray


def identify(
    gallery: Gallery,
    probes: np.ndarray,
    threshold: float | None = None,
    max_block_elements: int = 1 << 22,
) -> Identification:
    """Nearest template of each probe [M, D]; rejected ("unknown") above the threshold.

    ``threshold`` overrides the gallery's own. The [M, K] distances are computed for blocks of
    ``max(1, max_block_elements // K)`` probes at a time, so memory beyond the inputs stays at
    about ``max_block_elements`` float64 values (32 MiB) whatever M is.
    """
    t = gallery.threshold if threshold is None else threshold
    p = unit_rows(probes)
    g = np.asarray(gallery.embeddings, np.float64)
    if p.ndim != 2 or p.shape[1] != g.shape[1]:
        raise ValueError(f"probes must be [M, {g.shape[1]}], got {p.shape}")
    g_sq = (g * g).sum(1)
    nearest = np.zeros(len(p), np.int64)
    dist = np.zeros(len(p), np.float64)
    block = max(1, max_block_elements // max(1, len(g)))
    for start in range(0, len(p), block):
        q = p[start : start + block].astype(np.float64)
        d = np.maximum((q * q).sum(1)[:, None] + g_sq[None, :] - 2.0 * q @ g.T, 0.0)  # [b, K]
        k = np.argmin(d, axis=1)
        nearest[start : start + block] = k
        dist[start : start + block] = d[np.arange(len(q)), k]
    accepted = dist <= t
    names = [gallery.names[k] if a else UNKNOWN for k, a in zip(nearest, accepted, strict=True)]
    return Identification(names, nearest, dist, accepted)


# --------------------------------------------------------------------------- calibration


def comparison_distances(
    embeddings: np.ndarray,
    labels: np.ndarray,
    max_comparisons: int = 2_000_000,
    seed: int = 0,
    block_elements: int = 1 << 20,
) -> tuple[np.ndarray, np.ndarray]:
    """Genuine and impostor squared distances between the L2-normalised rows.

    Every unordered pair of distinct rows is used when there are at most ``max_comparisons``
    of them; otherwise ``max_comparisons`` pairs are drawn (half genuine, half impostor) with
    ``verification.sample_pairs``, their distances computed ``block_elements // D`` pairs at a
    time (memory: the [P] distances plus 3 x ``block_elements`` float64 values (24 MiB), not
    3 x [P, D]).

    Returns:
      ``(genuine, impostor)``: 1-D float64 arrays of distances.
    """
    e = unit_rows(embeddings).astype(np.float64)
    labels = np.asarray(labels).reshape(-1)
    keep = labels != IGNORE_LABEL
    e, labels = e[keep], labels[keep]
    n = len(labels)
    if n * (n - 1) // 2 > max_comparisons:
        i, j, same = verification.sample_pairs(labels, max_comparisons, seed)
        # In blocks of pairs: the gathered rows of all pairs at once are 3 x [P, D] float64.
        block = max(1, block_elements // e.shape[1])
        d = np.concatenate(
            [
                verification.pair_distances(e, i[s : s + block], j[s : s + block])
                for s in range(0, len(i), block)
            ]
        )
        return d[same], d[~same]
    genuine, impostor = [], []
    sq = (e * e).sum(1)
    for a in range(n - 1):  # row a against rows a+1..n-1: O(n) memory per step
        d = np.maximum(sq[a] + sq[a + 1 :] - 2.0 * e[a + 1 :] @ e[a], 0.0)
        same = labels[a + 1 :] == labels[a]
        genuine.append(d[same])
        impostor.append(d[~same])
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
    return cat(genuine), cat(impostor)


def threshold_for_far(impostor: np.ndarray, target_far: float) -> tuple[float, float]:
    """Largest threshold accepting at most ``floor(target_far * n)`` of n impostor distances.

    The threshold sits midway between the last accepted and the first rejected distance.

    Returns:
      ``(threshold, far_reached)`` with ``far_reached = mean(impostor <= threshold) <= target``.
    """
    s = np.sort(np.asarray(impostor, np.float64))
    if len(s) == 0:
        raise ValueError("threshold calibration needs impostor comparisons (>= 2 identities)")
    if not 0.0 <= target_far <= 1.0:
        raise ValueError(f"target FAR must be in [0, 1], got {target_far}")
    k = int(math.floor(target_far * len(s) + 1e-9))  # impostors we may accept
    if k >= len(s):
        t = s[-1]
    else:
        first_rejected = s[k]
        below = s[:k][s[:k] < first_rejected]
        t = (below[-1] + first_rejected) / 2 if len(below) else first_rejected
        if t >= first_rejected:  # nothing below, or adjacent floats
            t = np.nextafter(first_rejected, -np.inf)
    return float(t), float(np.mean(s <= t))


def calibrate_threshold(
    embeddings: np.ndarray,
    labels: np.ndarray,
    target_far: float,
    max_comparisons: int = 2_000_000,
    seed: int = 0,
) -> dict[str, float | None]:
    """Threshold for a target FAR over the impostor comparisons of a labelled validation set.

    Returns:
      threshold, target_far, far_reached, tar (fraction of genuine comparisons accepted; None if
      there are none), num_impostor_comparisons, num_genuine_comparisons.
    """
    genuine, impostor = comparison_distances(embeddings, labels, max_comparisons, seed)
    t, far = threshold_for_far(impostor, target_far)
    return {
        "threshold": t,
        "target_far": float(target_far),
        "far_reached": far,
        "tar": float(np.mean(genuine <= t)) if len(genuine) else None,
        "num_impostor_comparisons": float(len(impostor)),
        "num_genuine_comparisons": float(len(genuine)),
    }


def calibrate_fpir(gallery: Gallery, strangers: np.ndarray, target_fpir: float) -> dict[str, float]:
    """Threshold for a target false-positive identification rate (FPIR) against ``gallery``.

    A stranger is falsely accepted when its *nearest* template is within the threshold, so with
    K templates a per-comparison FAR of f lets through about ``1 - (1 - f)^K`` of the strangers.
    Calibrating on the nearest-template distances of stranger images (people not in the
    gallery) instead targets the rate a deployment with this gallery sees, whatever K is.

    Args:
      gallery: the enrolled templates.
      strangers: [M, D] embeddings of people who are not enrolled.
      target_fpir: the fraction of strangers that may be accepted.

    Returns:
      threshold, target_fpir, fpir_reached, num_strangers.
    """
    nearest = identify(gallery, strangers, threshold=math.inf).distance
    t, reached = threshold_for_far(nearest, target_fpir)
    return {
        "threshold": t,
        "target_fpir": float(target_fpir),
        "fpir_reached": reached,
        "num_strangers": float(len(nearest)),
    }


CALIBRATE_FOR = ("comparison", "gallery")


def calibrate_gallery(
    gallery: Gallery,
    embeddings: np.ndarray,
    labels: np.ndarray,
    target: float,
    calibrate_for: str = "comparison",
) -> tuple[Gallery, dict[str, float | None]]:
    """The gallery with its threshold calibrated for ``target`` on a labelled set of other people.

    Args:
      gallery: the enrolled templates (its own threshold is ignored).
      embeddings: [M, D], labels: [M] int, images of people who are not enrolled.
      target: the false-accept rate aimed at.
      calibrate_for: "comparison": ``target`` is the FAR per impostor comparison among the set's
        own pairs (``calibrate_threshold``); "gallery": ``target`` is the FPIR of this gallery, the
        set's images being strangers to it (``calibrate_fpir``).

    Returns:
      ``(calibrated gallery, the calibration's entries)``.
    """
    if calibrate_for == "comparison":
        calibration = calibrate_threshold(embeddings, labels, target)
    elif calibrate_for == "gallery":
        calibration = calibrate_fpir(gallery, embeddings, target)
    else:
        raise ValueError(f"calibrate_for: {calibrate_for!r}; valid: {list(CALIBRATE_FOR)}")
    threshold = calibration["threshold"]
    return dataclasses.replace(gallery, threshold=threshold, target_far=float(target)), calibration
