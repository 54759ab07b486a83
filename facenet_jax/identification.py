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
distances of stranger images. The open-set report measures, on an evaluation set split into
enrolled people and strangers: top-1 accuracy on enrolled people (closed set), the detection-and-
identification rate (correct and accepted), and the rate at which strangers are accepted.

N-way K-shot episodes (``episodes``) measure one-shot classification the standard way.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from facenet_jax.data.sampling import IGNORE_LABEL
from facenet_jax.evaluate import verification

UNKNOWN = "unknown"  # Name given to rejected probes.


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of x [N, D] scaled to unit norm (float32)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


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
    e = l2_normalize(embeddings)
    names = np.asarray(names, dtype=str)
    if len(names) != len(e) or len(e) == 0:
        raise ValueError(f"need one name per embedding row, got {len(names)} names, {len(e)} rows")
    uniq, inverse = np.unique(names, return_inverse=True)
    sums = np.zeros((len(uniq), e.shape[1]), np.float64)
    np.add.at(sums, inverse, e)
    return Gallery(l2_normalize(sums), [str(u) for u in uniq], fingerprint, threshold, target_far)


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
    p = l2_normalize(probes).astype(np.float64)
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
    e = l2_normalize(embeddings).astype(np.float64)
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
) -> dict[str, float]:
    """Threshold for a target FAR over the impostor comparisons of a labelled validation set.

    Returns:
      threshold, target_far, far_reached, tar (fraction of genuine comparisons accepted; nan if
      none), num_impostor_comparisons, num_genuine_comparisons.
    """
    genuine, impostor = comparison_distances(embeddings, labels, max_comparisons, seed)
    t, far = threshold_for_far(impostor, target_far)
    return {
        "threshold": t,
        "target_far": float(target_far),
        "far_reached": far,
        "tar": float(np.mean(genuine <= t)) if len(genuine) else math.nan,
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


# ------------------------------------------------------------------------- open-set report


def split_open_set(
    labels: np.ndarray, shots: int, enrolled_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits rows into enrolment images, probes of enrolled people, and probes of strangers.

    A fraction of the identities with more than ``shots`` images is enrolled with ``shots``
    random images each; their other images are probes. All images of the other identities are
    stranger probes.

    Returns:
      ``(enrol_idx, known_probe_idx, stranger_idx)`` int64 row indices.
    """
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng([seed, 0x0DE7])
    ids, counts = np.unique(labels[labels != IGNORE_LABEL], return_counts=True)
    eligible = ids[counts > shots]
    n_enrol = int(round(enrolled_fraction * len(eligible)))
    if n_enrol < 1 or n_enrol >= len(ids):
        raise ValueError(
            f"open-set split: {len(eligible)} of {len(ids)} identities have > {shots} images; "
            f"enrolled_fraction={enrolled_fraction} enrols {n_enrol}: need >= 1 enrolled and "
            ">= 1 stranger identity"
        )
    enrolled = rng.choice(eligible, n_enrol, replace=False)
    enrol_idx, known = [], []
    for ident in np.sort(enrolled):
        rows = rng.permutation(np.flatnonzero(labels == ident))
        enrol_idx.append(rows[:shots])
        known.append(rows[shots:])
    strangers = np.flatnonzero((labels != IGNORE_LABEL) & ~np.isin(labels, enrolled))
    return np.concatenate(enrol_idx), np.sort(np.concatenate(known)), strangers


def open_set_report(
    gallery: Gallery,
    probes: np.ndarray,
    probe_names: Sequence[str],
    threshold: float | None = None,
) -> dict[str, float]:
    """Open-set identification at the gallery's threshold (or at ``threshold``).

    Args:
      probes: [M, D] embeddings; probe_names: [M] true names (strangers: names not enrolled).

    Returns:
      top1_accuracy (nearest template correct, enrolled probes, no threshold),
      detection_identification_rate (correct and accepted), false_reject_rate (enrolled probes
      rejected), misidentification_rate (accepted under a wrong name), stranger_far (strangers
      accepted), threshold, target_far, and the counts.
    """
    result = identify(gallery, probes, threshold)
    truth = np.asarray(probe_names, dtype=str)
    known = np.isin(truth, np.asarray(gallery.names, dtype=str))
    correct = np.asarray(gallery.names, dtype=str)[result.nearest] == truth
    acc = result.accepted
    mean = lambda m: float(np.mean(m)) if len(m) else math.nan
    return {
        "top1_accuracy": mean(correct[known]),
        "detection_identification_rate": mean((correct & acc)[known]),
        "false_reject_rate": mean(~acc[known]),
        "misidentification_rate": mean((acc & ~correct)[known]),
        "stranger_far": mean(acc[~known]),
        "threshold": float(gallery.threshold if threshold is None else threshold),
        "target_far": float(gallery.target_far),
        "num_enrolled": float(len(gallery.names)),
        "num_known_probes": float(known.sum()),
        "num_stranger_probes": float((~known).sum()),
    }


def open_set_protocol(
    embeddings: np.ndarray,
    labels: np.ndarray,
    target_far: float = 1e-2,
    shots: int = 1,
    calibration_fraction: float = 0.5,
    enrolled_fraction: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Calibrate on some identities, then enrol/identify/reject on the others.

    Identities are split at random: ``calibration_fraction`` of them calibrate the threshold for
    ``target_far``; the rest are split by ``split_open_set`` into enrolled people (``shots``
    images each) and strangers.

    Returns:
      ``open_set_report`` plus ``calibration_*`` entries from ``calibrate_threshold``, and
      ``fpir_calibrated``: the same probes at the threshold ``calibrate_fpir`` sets for
      FPIR = ``target_far`` with the calibration identities as strangers to this gallery
      (threshold, calibration_fpir_reached, detection_identification_rate, false_reject_rate,
      stranger_fpir).
    """
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng([seed, 0xCA1])
    ids = np.unique(labels[labels != IGNORE_LABEL])
    calib_ids = rng.choice(ids, int(round(calibration_fraction * len(ids))), replace=False)
    in_calib = np.isin(labels, calib_ids)
    cal = calibrate_threshold(embeddings[in_calib], labels[in_calib], target_far, seed=seed)
    rest = np.flatnonzero(~in_calib & (labels != IGNORE_LABEL))
    enrol_idx, known, strangers = split_open_set(labels[rest], shots, enrolled_fraction, seed)
    names = labels.astype(str)
    gallery = enrol(
        embeddings[rest[enrol_idx]], names[rest[enrol_idx]], "", cal["threshold"], target_far
    )
    probes = rest[np.concatenate([known, strangers])]
    report = open_set_report(gallery, embeddings[probes], names[probes])
    report.update({f"calibration_{k}": v for k, v in cal.items()})
    # Gallery-aware alternative: the calibration identities are strangers to this gallery; a
    # threshold for FPIR = target_far on them, measured on the held-out strangers and probes.
    fpir = calibrate_fpir(gallery, embeddings[in_calib], target_far)
    at_fpir = open_set_report(gallery, embeddings[probes], names[probes], fpir["threshold"])
    report["fpir_calibrated"] = {
        "threshold": fpir["threshold"],
        "calibration_fpir_reached": fpir["fpir_reached"],
        **{k: at_fpir[k] for k in ("detection_identification_rate", "false_reject_rate")},
        "stranger_fpir": at_fpir["stranger_far"],
    }
    report["shots"] = float(shots)
    return report


# ------------------------------------------------------------------------------ episodes


def sample_episode(
    by_class: Sequence[np.ndarray], way: int, shot: int, queries: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Support [way, shot] and query [way, queries] row indices of one episode.

    ``by_class`` lists the rows of each class with >= shot + queries rows; ``way`` distinct
    classes are drawn, and within each class disjoint support and query rows.
    """
    classes = rng.choice(len(by_class), way, replace=False)
    support = np.empty((way, shot), np.int64)
    query = np.empty((way, queries), np.int64)
    for w, c in enumerate(classes):
        rows = rng.choice(by_class[c], shot + queries, replace=False)
        support[w], query[w] = rows[:shot], rows[shot:]
    return support, query


def episode_accuracy(embeddings: np.ndarray, support: np.ndarray, query: np.ndarray) -> float:
    """Fraction of queries whose nearest class prototype (normalised mean of the normalised
    support embeddings) is their own class. support: [way, shot], query: [way, q] row indices."""
    e = np.asarray(embeddings)
    protos = l2_normalize(l2_normalize(e[support]).mean(axis=1))  # [way, D]
    q = l2_normalize(e[query.reshape(-1)])  # [way*q, D]
    d = (q * q).sum(1)[:, None] + (protos * protos).sum(1)[None, :] - 2.0 * q @ protos.T
    truth = np.repeat(np.arange(len(support)), query.shape[1])
    return float(np.mean(np.argmin(d, axis=1) == truth))


def episodes(
    embeddings: np.ndarray,
    labels: np.ndarray,
    way: int,
    shot: int,
    num_episodes: int = 1000,
    queries: int = 1,
    seed: int = 0,
) -> dict[str, float]:
    """N-way K-shot classification by nearest prototype, averaged over random episodes.

    Returns:
      accuracy (mean over episodes), ci95 (1.96 * std / sqrt(episodes)), way, shot, queries,
      num_episodes, num_classes (classes with enough images to take part).
    """
    labels = np.asarray(labels).reshape(-1)
    ids, counts = np.unique(labels[labels != IGNORE_LABEL], return_counts=True)
    usable = ids[counts >= shot + queries]
    if len(usable) < way:
        raise ValueError(
            f"{way}-way {shot}-shot episodes with {queries} queries need {way} classes with "
            f">= {shot + queries} images; only {len(usable)} of {len(ids)} classes have them"
        )
    by_class = [np.flatnonzero(labels == c) for c in usable]
    rng = np.random.default_rng([seed, 0xE915])
    accs = np.array(
        [
            episode_accuracy(embeddings, *sample_episode(by_class, way, shot, queries, rng))
            for _ in range(num_episodes)
        ]
    )
    std = accs.std(ddof=1) if num_episodes > 1 else 0.0
    return {
        "accuracy": float(accs.mean()),
        "ci95": float(1.96 * std / math.sqrt(num_episodes)),
        "way": float(way),
        "shot": float(shot),
        "queries": float(queries),
        "num_episodes": float(num_episodes),
        "num_classes": float(len(usable)),
    }
