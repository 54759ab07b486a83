"""Face verification metrics: pair sampling, distances, accuracy, ROC, EER, TAR@FAR, per-group.

Convention everywhere: a pair is predicted "same person" iff its distance ``d <= threshold``. For
the L2-normalised FaceNet embeddings the distance is the squared Euclidean one,
``d = ||f(x1) - f(x2)||^2`` in [0, 4]. Any score where lower means "more alike" (for example the
negative log-odds of ``similarity_head``) can be passed as ``distances``.

Definitions, for thresholds t over the pairs:

* ``TAR(t) = #{same pairs with d <= t} / #same``  (true-accept rate, VAL in FaceNet),
* ``FAR(t) = #{different pairs with d <= t} / #different``  (false-accept rate),
* best-threshold accuracy ``max_t mean[(d <= t) == issame]``,
* EER: the point where the ROC polyline (FAR, TAR) crosses ``FAR = 1 - TAR``,
* ``TAR@FAR=f``: TAR at the largest threshold whose FAR does not exceed f (the FAR actually
  reached is reported with it, since with n impostor pairs FAR moves in steps of 1/n).

ROC and AUC come from scikit-learn (on the score ``-d``); the k-fold split from
``sklearn.model_selection.KFold``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from sklearn import metrics as sk_metrics
from sklearn.model_selection import KFold

from facenet_jax.labels import IGNORE_LABEL

FAR_TARGETS = (1e-3, 1e-2)


# ----------------------------------------------------------------------------- pairs


def sample_pairs(
    labels: np.ndarray, num_pairs: int, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws same/different pairs of rows, half of each (the odd one out is a different pair).

    Same pairs: the first row is uniform over rows whose identity has >= 2 rows, the second uniform
    over the other rows of that identity. Different pairs: the first row is uniform over the valid
    rows, the second uniform over the rows of the other identities; with ``groups``, over the
    other identities of the first row's group only (demographic protocols such as BFW compare
    impostors within a group). Pairs are drawn with replacement and never pair a row with itself.
    Rows labelled ``IGNORE_LABEL`` (padding) are never used, so an identity with a single image
    only appears in different pairs.

    Args:
      labels: [M] int identity of each row (``IGNORE_LABEL`` = padding).
      num_pairs: N, total pairs (>= 2).
      seed: the pairs are a pure function of (labels, num_pairs, seed, groups).
      groups: optional [M] int group of each row; an identity must lie in a single group.

    Returns:
      ``(i, j, issame)``: [N] int64, [N] int64 row indices and [N] bool; the first ``N // 2`` pairs
      are the same-identity ones.
    """
    labels = np.asarray(labels).reshape(-1)
    if num_pairs < 2:
        raise ValueError(
            f"num_pairs must be >= 2 (one same and one different pair), got {num_pairs}"
        )
    valid = np.flatnonzero(labels != IGNORE_LABEL)
    grp = np.zeros(len(labels), np.int64) if groups is None else np.asarray(groups).reshape(-1)
    identity_groups = np.unique(np.stack([labels[valid], grp[valid]], axis=1), axis=0)
    if len(identity_groups) != len(np.unique(labels[valid])):
        raise ValueError("sample_pairs: an identity spans several groups")
    # Rows sorted by (group, identity): identity k occupies positions [start[k], start[k] +
    # count[k]) inside its group's positions [gstart, gstart + gcount).
    order = valid[np.lexsort((labels[valid], grp[valid]))]
    uniq, start, count = np.unique(labels[order], return_index=True, return_counts=True)
    if len(uniq) < 2:
        raise ValueError(
            f"sample_pairs needs >= 2 identities among the valid rows, found {len(uniq)} "
            f"({len(valid)} valid rows of {len(labels)})"
        )
    if count.max() < 2:
        raise ValueError(
            f"sample_pairs: no same-identity pair exists: all {len(uniq)} identities have a "
            "single image"
        )
    ident = np.searchsorted(uniq, labels[order])  # identity of each sorted position
    _, g_start, g_inv, g_count = np.unique(
        grp[order], return_inverse=True, return_index=True, return_counts=True
    )
    rng = np.random.default_rng([seed, 0x5A17])
    n_same = num_pairs // 2
    n_diff = num_pairs - n_same

    # Same pairs: draw the other image's offset within the identity, skipping the anchor itself.
    a = rng.choice(np.flatnonzero(count[ident] >= 2), size=n_same)
    k = ident[a]
    r = rng.integers(0, count[k] - 1)
    b = start[k] + r + (r >= a - start[k])

    # Different pairs: draw among the group's positions outside the anchor's identity block.
    others = g_count[g_inv] - count[ident]
    if not (others > 0).any():
        raise ValueError("sample_pairs: no group holds two identities, so no different pair")
    c = rng.choice(np.flatnonzero(others > 0), size=n_diff)
    h = ident[c]
    s = g_start[g_inv[c]] + rng.integers(0, others[c])
    s = np.where(s < start[h], s, s + count[h])

    i = np.concatenate([order[a], order[c]]).astype(np.int64)
    j = np.concatenate([order[b], order[s]]).astype(np.int64)
    issame = np.concatenate([np.ones(n_same, bool), np.zeros(n_diff, bool)])
    return i, j, issame


def pair_distances(embeddings: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``||e[i] - e[j]||^2``.

    Args:
      embeddings: [M, D] float.
      i, j: [N] int row indices.

    Returns:
      [N] float64.
    """
    e = np.asarray(embeddings, np.float64)
    diff = e[np.asarray(i)] - e[np.asarray(j)]
    return np.einsum("nd,nd->n", diff, diff)


# ---------------------------------------------------------------------- threshold search


def _check(distances: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(distances, np.float64).reshape(-1)
    y = np.asarray(issame).reshape(-1).astype(bool)
    if d.shape != y.shape:
        raise ValueError(f"distances {d.shape} and issame {y.shape} must have the same length")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"distances: {int((~np.isfinite(d)).sum())} non-finite values")
    if y.all() or not y.any():
        raise ValueError(
            f"verification needs both same and different pairs, got {int(y.sum())} same and "
            f"{int((~y).sum())} different"
        )
    return d, y


def candidate_thresholds(distances: np.ndarray) -> np.ndarray:
    """Thresholds that realise every distinct decision on these distances, ascending.

    Just below the smallest distance (everything "different"), the midpoints between consecutive
    distinct distances, and the largest distance (everything "same").
    """
    u = np.unique(np.asarray(distances, np.float64))
    return np.concatenate([[np.nextafter(u[0], -np.inf)], (u[:-1] + u[1:]) / 2, [u[-1]]])


def best_threshold(distances: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """The threshold maximising accuracy, and that accuracy.

    Searches ``candidate_thresholds``; among equally accurate thresholds the smallest is taken.
    O(N log N): the number of correct decisions at each candidate is
    ``#same with d <= t + #different with d > t``, from cumulative counts.
    """
    d, y = np.asarray(distances, np.float64), np.asarray(issame, bool)
    t = candidate_thresholds(d)
    same_below = np.searchsorted(np.sort(d[y]), t, side="right")
    diff_below = np.searchsorted(np.sort(d[~y]), t, side="right")
    correct = same_below + ((~y).sum() - diff_below)
    k = int(np.argmax(correct))
    return float(t[k]), float(correct[k] / len(d))


def accuracy_at(distances: np.ndarray, issame: np.ndarray, threshold: float) -> float:
    """Fraction of pairs decided correctly by ``d <= threshold``."""
    return float(np.mean((np.asarray(distances) <= threshold) == np.asarray(issame, bool)))


def fold_accuracies(
    distances: np.ndarray,
    issame: np.ndarray,
    splits: Iterable[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy on each test fold with the threshold tuned (``best_threshold``) on its train folds.

    Returns:
      ``(accuracies, thresholds)``: [F] float64 each.
    """
    d, y = np.asarray(distances, np.float64), np.asarray(issame, bool)
    accs, thresholds = [], []
    for train, test in splits:
        if y[train].all() or not y[train].any():
            raise ValueError("a training fold holds only same or only different pairs")
        t, _ = best_threshold(d[train], y[train])
        thresholds.append(t)
        accs.append(accuracy_at(d[test], y[test], t))
    return np.asarray(accs), np.asarray(thresholds)


def kfold_splits(num_pairs: int, num_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Shuffled ``sklearn.model_selection.KFold`` splits of the pair indices."""
    if not 2 <= num_folds <= num_pairs:
        raise ValueError(f"num_folds must be in [2, num_pairs={num_pairs}], got {num_folds}")
    kf = KFold(n_splits=num_folds, shuffle=True, random_state=seed)
    return list(kf.split(np.arange(num_pairs)))


def fold_id_splits(fold_ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Leave-one-fold-out splits from an explicit fold id per pair (the LFW View 2 protocol)."""
    fold_ids = np.asarray(fold_ids).reshape(-1)
    folds = np.unique(fold_ids)
    if len(folds) < 2:
        raise ValueError(f"need >= 2 folds for threshold tuning on other folds, got {len(folds)}")
    return [(np.flatnonzero(fold_ids != f), np.flatnonzero(fold_ids == f)) for f in folds]


# -------------------------------------------------------------------------- ROC, EER, TAR


def roc_curve(
    distances: np.ndarray, issame: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC over all thresholds (``sklearn.metrics.roc_curve`` on the score ``-d``).

    Returns:
      ``(far, tar, thresholds)``: [T] each; FAR and TAR non-decreasing, ``thresholds[k]`` the
      distance threshold (``d <= thresholds[k]`` is "same") giving ``(far[k], tar[k])``; the first
      threshold is ``-inf`` (nothing accepted).
    """
    d, y = _check(distances, issame)
    far, tar, thr = sk_metrics.roc_curve(y, -d, drop_intermediate=False)
    return far, tar, -thr


def equal_error_rate(far: np.ndarray, tar: np.ndarray) -> float:
    """Where the ROC polyline through (far, tar) crosses ``FAR = FRR = 1 - TAR``.

    ``FRR - FAR`` decreases from 1 to -1 along the curve; the crossing is linearly interpolated
    on the first segment where it changes sign.
    """
    gap = (1.0 - tar) - far
    k = int(np.argmax(gap <= 0))
    if gap[k] == 0 or k == 0:
        return float(far[k])
    s = gap[k - 1] / (gap[k - 1] - gap[k])
    return float(far[k - 1] + s * (far[k] - far[k - 1]))


def tar_at_far(
    far: np.ndarray, tar: np.ndarray, thresholds: np.ndarray, target: float
) -> tuple[float, float, float]:
    """TAR at the largest threshold with ``FAR <= target``: ``(tar, far_reached, threshold)``."""
    k = int(np.flatnonzero(far <= target)[-1])  # far[0] == 0, so this always exists
    return float(tar[k]), float(far[k]), float(thresholds[k])


def far_key(far: float) -> str:
    """``1e-3 -> "1e-3"``, ``0.05 -> "0.05"``: the suffix of the ``tar_at_far_*`` keys."""
    e = round(math.log10(far))
    return f"1e{e}" if math.isclose(far, 10.0**e) else f"{far:g}"


def verification_metrics(
    distances: np.ndarray,
    issame: np.ndarray,
    num_folds: int = 10,
    seed: int = 0,
    far_targets: Sequence[float] = FAR_TARGETS,
    splits: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, float]:
    """All verification numbers for one set of pairs.

    Args:
      distances: [N] float, lower = more alike; "same" iff ``d <= threshold``.
      issame: [N] bool ground truth.
      num_folds: folds of the shuffled KFold (used when ``splits`` is None).
      seed: KFold shuffle seed.
      far_targets: FAR values f reported as ``tar_at_far_<f>`` and ``far_<f>_reached``.
      splits: explicit (train, test) index splits, e.g. ``fold_id_splits`` of the LFW folds.

    Returns:
      JSON-serialisable floats: accuracy and threshold (best threshold on all pairs), auc, eer,
      kfold_accuracy_mean / kfold_accuracy_std (population std over folds; each fold's threshold
      is tuned on the other folds), tar_at_far_<f>, far_<f>_reached, num_pairs, num_same,
      num_different.
    """
    d, y = _check(distances, issame)
    threshold, accuracy = best_threshold(d, y)
    far, tar, thr = roc_curve(d, y)
    if splits is None:
        splits = kfold_splits(len(d), num_folds, seed)
    accs, _ = fold_accuracies(d, y, splits)
    out = {
        "accuracy": accuracy,
        "threshold": threshold,
        "auc": float(sk_metrics.roc_auc_score(y, -d)),
        "eer": equal_error_rate(far, tar),
        "kfold_accuracy_mean": float(accs.mean()),
        "kfold_accuracy_std": float(accs.std()),
    }
    for f in far_targets:
        t, reached, _ = tar_at_far(far, tar, thr, f)
        out[f"tar_at_far_{far_key(f)}"] = t
        out[f"far_{far_key(f)}_reached"] = reached
    out.update(num_pairs=float(len(d)), num_same=float(y.sum()), num_different=float((~y).sum()))
    return out


# ------------------------------------------------------------------------------ per group


def pair_groups(groups: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Group of each pair: that of its first (probe) image.

    Same pairs share their identity and hence their group; for different pairs the probe's group
    is the one whose false accepts are counted.
    """
    del j
    return np.asarray(groups)[np.asarray(i)]


def group_metrics(
    distances: np.ndarray,
    issame: np.ndarray,
    pair_group: np.ndarray,
    group_names: Sequence[str] | None = None,
    far_targets: Sequence[float] = FAR_TARGETS,
) -> dict:
    """Verification per group, and each group's error rates at the single global threshold.

    Args:
      distances: [N], issame: [N] bool, pair_group: [N] int group id of each pair (``pair_groups``).
      group_names: name of each group id; ids are used when None.

    Returns:
      ``{"global_threshold": t, "groups": {name: {...}}}`` where each group has accuracy and
      threshold (its own best threshold), tar_at_far_<f> / far_<f>_reached, auc, and at the global
      best threshold t: accuracy_at_global_threshold, far_at_global_threshold,
      tar_at_global_threshold. Values that a group cannot define (no same or no different pairs)
      are None.
    """
    d, y = _check(distances, issame)
    pg = np.asarray(pair_group).reshape(-1)
    if pg.shape != d.shape:
        raise ValueError(f"pair_group {pg.shape} must match distances {d.shape}")
    t_global, _ = best_threshold(d, y)
    out: dict = {"global_threshold": t_global, "groups": {}}
    for g in np.unique(pg):
        m = pg == g
        dg, yg = d[m], y[m]
        name = str(group_names[int(g)]) if group_names is not None else str(int(g))
        r: dict = {
            "num_same": int(yg.sum()),
            "num_different": int((~yg).sum()),
            "accuracy_at_global_threshold": accuracy_at(dg, yg, t_global),
            "far_at_global_threshold": float(np.mean(dg[~yg] <= t_global)) if (~yg).any() else None,
            "tar_at_global_threshold": float(np.mean(dg[yg] <= t_global)) if yg.any() else None,
        }
        if yg.any() and (~yg).any():
            r["threshold"], r["accuracy"] = best_threshold(dg, yg)
            far, tar, thr = roc_curve(dg, yg)
            r["auc"] = float(sk_metrics.roc_auc_score(yg, -dg))
            for f in far_targets:
                r[f"tar_at_far_{far_key(f)}"], r[f"far_{far_key(f)}_reached"], _ = tar_at_far(
                    far, tar, thr, f
                )
        else:
            r.update(threshold=None, accuracy=None, auc=None)
            for f in far_targets:
                r[f"tar_at_far_{far_key(f)}"] = r[f"far_{far_key(f)}_reached"] = None
        out["groups"][name] = r
    return out
