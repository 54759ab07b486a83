"""Open-set identification on a labelled set: calibrate a threshold, enrol, identify or reject.

The identities of the set are split at random: some calibrate the rejection threshold for a
target false-accept rate (``identification.calibrate_threshold``); the others are split into
enrolled people (``shots`` images each make a gallery template) and strangers. Every other image
is then a probe, identified against the gallery (``identification.identify``). Reported:

* ``top1_accuracy``: enrolled probes whose nearest template is their own (closed set, no threshold),
* ``detection_identification_rate``: enrolled probes correct *and* accepted (DIR),
* ``false_reject_rate`` and ``misidentification_rate`` of the enrolled probes,
* ``stranger_far``: strangers accepted under some name. With K templates and a per-comparison FAR
  f this is about ``1 - (1 - f)^K``; ``fpir_calibrated`` repeats the report at the threshold
  ``identification.calibrate_fpir`` sets for the target on the calibration identities, as strangers
  to this gallery.

Rates over an empty set of probes are None (undefined), never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from facenet_jax import identification
from facenet_jax.labels import IGNORE_LABEL


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


def _rate(mask: np.ndarray) -> float | None:
    return float(np.mean(mask)) if len(mask) else None


def open_set_report(
    gallery: identification.Gallery,
    probes: np.ndarray,
    probe_names: Sequence[str],
    threshold: float | None = None,
) -> dict[str, float | None]:
    """Open-set identification at the gallery's threshold (or at ``threshold``).

    Args:
      gallery: the enrolled templates.
      probes: [M, D] embeddings; probe_names: [M] true names (strangers: names not enrolled).

    Returns:
      top1_accuracy (nearest template correct, enrolled probes, no threshold),
      detection_identification_rate (correct and accepted), false_reject_rate (enrolled probes
      rejected), misidentification_rate (accepted under a wrong name), stranger_far (strangers
      accepted), threshold, target_far (None if the gallery was not calibrated), and the counts.
    """
    result = identification.identify(gallery, probes, threshold)
    truth = np.asarray(probe_names, dtype=str)
    known = np.isin(truth, np.asarray(gallery.names, dtype=str))
    correct = np.asarray(gallery.names, dtype=str)[result.nearest] == truth
    acc = result.accepted
    return {
        "top1_accuracy": _rate(correct[known]),
        "detection_identification_rate": _rate((correct & acc)[known]),
        "false_reject_rate": _rate(~acc[known]),
        "misidentification_rate": _rate((acc & ~correct)[known]),
        "stranger_far": _rate(acc[~known]),
        "threshold": float(gallery.threshold if threshold is None else threshold),
        "target_far": None if math.isnan(gallery.target_far) else float(gallery.target_far),
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

    Args:
      embeddings: [N, D]; labels: [N] int identity (``IGNORE_LABEL`` rows are left out).
      target_far: the false-accept rate the threshold is calibrated for.
      shots: images enrolled per person.
      calibration_fraction: share of the identities that calibrate the threshold; the rest are
        split by ``split_open_set`` into enrolled people (``enrolled_fraction``) and strangers.

    Returns:
      ``open_set_report`` plus ``calibration_*`` entries from ``calibrate_threshold``, ``shots``,
      and ``fpir_calibrated``: the same probes at the threshold ``calibrate_fpir`` sets for
      FPIR = ``target_far`` with the calibration identities as strangers to this gallery
      (threshold, calibration_fpir_reached, detection_identification_rate, false_reject_rate,
      stranger_fpir).
    """
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng([seed, 0xCA1])
    ids = np.unique(labels[labels != IGNORE_LABEL])
    calib_ids = rng.choice(ids, int(round(calibration_fraction * len(ids))), replace=False)
    in_calib = np.isin(labels, calib_ids)
    cal = identification.calibrate_threshold(
        embeddings[in_calib], labels[in_calib], target_far, seed=seed
    )
    rest = np.flatnonzero(~in_calib & (labels != IGNORE_LABEL))
    enrol_idx, known, strangers = split_open_set(labels[rest], shots, enrolled_fraction, seed)
    names = labels.astype(str)
    gallery = identification.enrol(
        embeddings[rest[enrol_idx]], names[rest[enrol_idx]], "", cal["threshold"], target_far
    )
    probes = rest[np.concatenate([known, strangers])]
    report = open_set_report(gallery, embeddings[probes], names[probes])
    report.update({f"calibration_{k}": v for k, v in cal.items()})
    # Gallery-aware alternative: the calibration identities are strangers to this gallery; a
    # threshold for FPIR = target_far on them, measured on the held-out strangers and probes.
    fpir = identification.calibrate_fpir(gallery, embeddings[in_calib], target_far)
    at_fpir = open_set_report(gallery, embeddings[probes], names[probes], fpir["threshold"])
    report["fpir_calibrated"] = {
        "threshold": fpir["threshold"],
        "calibration_fpir_reached": fpir["fpir_reached"],
        **{k: at_fpir[k] for k in ("detection_identification_rate", "false_reject_rate")},
        "stranger_fpir": at_fpir["stranger_far"],
    }
    report["shots"] = float(shots)
    return report
