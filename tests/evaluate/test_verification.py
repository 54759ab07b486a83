"""Verification metrics against slow, obvious references on synthetic distances."""

import json

import numpy as np
import pytest
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn.model_selection import KFold

from facenet_jax.data.sampling import IGNORE_LABEL
from facenet_jax.evaluate import verification


def synthetic(n=600, seed=0, round_to=None):
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    d = np.where(issame, rng.normal(0.8, 0.3, n), rng.normal(1.5, 0.35, n))
    if round_to is not None:
        d = np.round(d, round_to)  # creates ties
    return d, issame


def slow_best_threshold(d, y):
    """Scans every midpoint (and the two ends) in ascending order; keeps the first best."""
    u = np.unique(d)
    cands = [u[0] - 1e-9] + [(a + b) / 2 for a, b in zip(u[:-1], u[1:], strict=True)] + [u[-1]]
    best_t, best_acc = None, -1.0
    for t in cands:
        acc = np.mean((d <= t) == y)
        if acc > best_acc:
            best_t, best_acc = t, acc
    return best_t, best_acc


def slow_far_tar(d, y, t):
    return np.mean(d[~y] <= t), np.mean(d[y] <= t)


# ----------------------------------------------------------------------------- pairs


def test_sample_pairs_labels_and_determinism():
    labels = np.repeat(np.arange(7), [1, 2, 3, 5, 8, 1, 4])
    labels[[3, 10]] = IGNORE_LABEL
    i, j, issame = verification.sample_pairs(labels, 401, seed=3)
    assert len(i) == len(j) == len(issame) == 401
    assert issame.sum() == 200 and issame[:200].all() and not issame[200:].any()
    np.testing.assert_array_equal(labels[i] == labels[j], issame)
    assert np.all(i != j)
    assert not np.isin([3, 10], np.concatenate([i, j])).any()
    # An identity with a single image appears only in different pairs.
    single = np.flatnonzero(labels == 0)
    assert np.isin(single, np.concatenate([i, j])[~np.tile(issame, 2)]).any()
    assert not np.isin(single, np.concatenate([i[issame], j[issame]])).any()
    again = verification.sample_pairs(labels, 401, seed=3)
    for a, b in zip((i, j, issame), again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = verification.sample_pairs(labels, 401, seed=4)
    assert not np.array_equal(i, other[0])


def test_sample_pairs_covers_all_valid_pairs_uniformly_enough():
    labels = np.array([0, 0, 1, 1, 1, 2])
    i, j, issame = verification.sample_pairs(labels, 6000, seed=0)
    same = {(a, b) for a, b in zip(i[issame], j[issame], strict=True)}
    assert same == {(a, b) for a in range(6) for b in range(6) if a != b and labels[a] == labels[b]}
    diff = {(a, b) for a, b in zip(i[~issame], j[~issame], strict=True)}
    assert diff == {(a, b) for a in range(6) for b in range(6) if labels[a] != labels[b]}


def test_sample_pairs_within_groups():
    labels = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5])
    groups = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2])  # group 2 has a single identity
    i, j, issame = verification.sample_pairs(labels, 8000, seed=1, groups=groups)
    np.testing.assert_array_equal(labels[i] == labels[j], issame)
    assert np.all(groups[i] == groups[j])
    diff = {(a, b) for a, b in zip(i[~issame], j[~issame], strict=True)}
    assert diff == {
        (a, b)
        for a in range(11)
        for b in range(11)
        if labels[a] != labels[b] and groups[a] == groups[b]
    }
    with pytest.raises(ValueError, match="spans several groups"):
        verification.sample_pairs(labels, 10, seed=0, groups=np.arange(11) % 2)
    with pytest.raises(ValueError, match="no group holds two identities"):
        verification.sample_pairs(labels, 10, seed=0, groups=labels)


def test_sample_pairs_errors():
    with pytest.raises(ValueError, match="no same-identity pair"):
        verification.sample_pairs(np.arange(5), 10, seed=0)
    with pytest.raises(ValueError, match=">= 2 identities"):
        verification.sample_pairs(np.array([1, 1, 1, IGNORE_LABEL]), 10, seed=0)


def test_pair_distances_matches_loop():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(20, 5)).astype(np.float32)
    i, j = rng.integers(0, 20, 30), rng.integers(0, 20, 30)
    want = [float(np.sum((e[a].astype(float) - e[b]) ** 2)) for a, b in zip(i, j, strict=True)]
    np.testing.assert_allclose(verification.pair_distances(e, i, j), want, rtol=1e-6)


# ------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("round_to", [None, 1])
def test_best_threshold_matches_sweep(round_to):
    d, y = synthetic(round_to=round_to)
    t, acc = verification.best_threshold(d, y)
    want_t, want_acc = slow_best_threshold(d, y)
    assert acc == pytest.approx(want_acc)
    assert t == pytest.approx(want_t, abs=1e-8)
    assert verification.accuracy_at(d, y, t) == pytest.approx(acc)
    # No threshold at all (not only the candidates) does better.
    grid = np.linspace(d.min() - 0.1, d.max() + 0.1, 3001)
    assert max(np.mean((d <= g) == y) for g in grid) <= acc + 1e-12


@pytest.mark.parametrize("round_to", [None, 2])
def test_verification_metrics_against_references(round_to):
    d, y = synthetic(round_to=round_to, seed=1)
    m = verification.verification_metrics(d, y, num_folds=10, seed=5)
    json.dumps(m)
    _, want_acc = slow_best_threshold(d, y)
    assert m["accuracy"] == pytest.approx(want_acc)
    # AUC as the Mann-Whitney probability that a different pair is farther than a same pair.
    pos, neg = d[y], d[~y]
    auc = np.mean((neg[None, :] > pos[:, None]) + 0.5 * (neg[None, :] == pos[:, None]))
    assert m["auc"] == pytest.approx(auc)
    # EER: root of FRR(FAR) = FAR on the linearly interpolated ROC (FaceNet's recipe).
    thresholds = np.concatenate([[-np.inf], np.unique(d)])
    far = np.array([slow_far_tar(d, y, t)[0] for t in thresholds])
    tar = np.array([slow_far_tar(d, y, t)[1] for t in thresholds])
    eer = brentq(lambda x: 1.0 - x - interp1d(far, tar)(x), 0.0, 1.0)
    assert m["eer"] == pytest.approx(eer, abs=1e-9)
    # TAR@FAR: the best TAR over thresholds whose FAR does not exceed the target.
    for f, key in [(1e-3, "1e-3"), (1e-2, "1e-2")]:
        ok = far <= f
        k = np.flatnonzero(ok)[np.argmax(tar[ok])]
        assert m[f"tar_at_far_{key}"] == pytest.approx(tar[k])
        assert m[f"far_{key}_reached"] == pytest.approx(far[ok].max())
        assert m[f"far_{key}_reached"] <= f
    # 10-fold: thresholds tuned on the other nine folds by the slow sweep.
    accs = []
    for train, test in KFold(10, shuffle=True, random_state=5).split(d):
        t, _ = slow_best_threshold(d[train], y[train])
        accs.append(np.mean((d[test] <= t) == y[test]))
    assert m["kfold_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert m["kfold_accuracy_std"] == pytest.approx(np.std(accs))
    assert m["num_pairs"] == len(d)


def test_roc_curve_thresholds_reproduce_rates():
    d, y = synthetic(n=200, seed=2, round_to=1)
    far, tar, thr = verification.roc_curve(d, y)
    assert thr[0] == -np.inf and far[0] == 0 and tar[-1] == 1
    for a, b, t in zip(far, tar, thr, strict=True):
        assert (a, b) == pytest.approx(slow_far_tar(d, y, t))


def test_perfect_separation():
    d = np.array([0.1, 0.2, 0.3, 1.0, 1.1, 1.2])
    y = np.array([1, 1, 1, 0, 0, 0], bool)
    m = verification.verification_metrics(d, y, num_folds=3)
    assert m["accuracy"] == 1 and m["auc"] == 1 and m["eer"] == 0
    assert 0.3 < m["threshold"] < 1.0
    assert m["tar_at_far_1e-3"] == 1 and m["far_1e-3_reached"] == 0


def test_errors_are_clear():
    with pytest.raises(ValueError, match="both same and different"):
        verification.verification_metrics(np.ones(4), np.ones(4, bool))
    with pytest.raises(ValueError, match="same length"):
        verification.verification_metrics(np.ones(4), np.ones(3, bool))
    with pytest.raises(ValueError, match="num_folds"):
        verification.verification_metrics(np.arange(4.0), np.array([1, 0, 1, 0], bool), num_folds=5)


def test_fold_id_splits_leave_one_fold_out():
    d, y = synthetic(n=120, seed=3)
    folds = np.repeat(np.arange(4), 30)
    accs, thresholds = verification.fold_accuracies(d, y, verification.fold_id_splits(folds))
    for f in range(4):
        t, _ = slow_best_threshold(d[folds != f], y[folds != f])
        assert thresholds[f] == pytest.approx(t)
        assert accs[f] == pytest.approx(np.mean((d[folds == f] <= t) == y[folds == f]))


def test_group_metrics_against_subsets():
    d, y = synthetic(n=400, seed=4)
    groups = np.random.default_rng(0).integers(0, 3, 400)
    y[groups == 2] = False  # a group with no same pairs
    out = verification.group_metrics(d, y, groups, group_names=["a", "b", "c"])
    t, _ = slow_best_threshold(d, y)
    assert out["global_threshold"] == pytest.approx(t)
    for g, name in enumerate("ab"):
        m = groups == g
        r = out["groups"][name]
        _, acc = slow_best_threshold(d[m], y[m])
        assert r["accuracy"] == pytest.approx(acc)
        assert r["far_at_global_threshold"] == pytest.approx(np.mean(d[m & ~y] <= t))
        assert r["tar_at_global_threshold"] == pytest.approx(np.mean(d[m & y] <= t))
    c = out["groups"]["c"]
    assert c["accuracy"] is None and c["tar_at_global_threshold"] is None
    assert c["far_at_global_threshold"] == pytest.approx(np.mean(d[groups == 2] <= t))
    json.dumps(out)


def test_pair_groups_uses_probe():
    groups = np.array([0, 0, 1, 1])
    np.testing.assert_array_equal(
        verification.pair_groups(groups, np.array([0, 2]), np.array([2, 0])), [0, 1]
    )


def test_far_key():
    assert verification.far_key(1e-3) == "1e-3"
    assert verification.far_key(0.01) == "1e-2"
    assert verification.far_key(0.05) == "0.05"
