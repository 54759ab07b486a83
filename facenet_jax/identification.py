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
        with np.load(path, allow_pickle=False) as z:
            missing = {"embeddings", "names", "fingerprint", "threshold"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a gallery file, missing {sorted(missing)}")
            return cls(
                embeddings=z["embeddings"],
                names=[str(n) for n in z["names"]],
                fingerprint=str(z["fingerprint"]),
                threshold=float(z["threshold"]),
                target_far=float(z["target_far"]) if "target_far" in z.files else math.nan,
            )

    def check_fingerprint(self, fingerprint: str) -> None:
        """Raises ValueError if the gallery was enrolled with another model."""
        if self.fingerprint and fingerprint != self.fingerprint:
            raise ValueError(
                f"gallery was enrolled with model {self.fingerprint!r}, not {fingerprint!r}; "
                "re-enrol with this model"
            )


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
    gallery: Gallery, probes: np.ndarray, threshold: float | None = None
) -> Identification:
    """Nearest template of each probe [M, D]; rejected ("unknown") above the threshold.

    ``threshold`` overrides the gallery's own.
    """
    t = gallery.threshold if threshold is None else threshold
    p = unit_rows(probes).astype(np.float64)
    g = np.asarray(gallery.embeddings, np.float64)
    if p.ndim != 2 or p.shape[1] != g.shape[1]:
        raise ValueError(f"probes must be [M, {g.shape[1]}], got {p.shape}")
    d = np.maximum((p * p).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2.0 * p @ g.T, 0.0)  # [M, K]
    nearest = np.argmin(d, axis=1)
    dist = d[np.arange(len(p)), nearest]
    accepted = dist <= t
    names = [gallery.names[k] if a else UNKNOWN for k, a in zip(nearest, accepted, strict=True)]
    return Identification(names, nearest, dist, accepted)


# --------------------------------------------------------------------------- calibration


def comparison_distances(
    embeddings: np.ndarray, labels: np.ndarray, max_comparisons: int = 2_000_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Genuine and impostor squared distances between the L2-normalised rows.

    Every unordered pair of distinct rows is used when there are at most ``max_comparisons``
    of them; otherwise ``max_comparisons`` pairs are drawn (half genuine, half impostor) with
    ``verification.sample_pairs``.

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
        d = verification.pair_distances(e, i, j)
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
