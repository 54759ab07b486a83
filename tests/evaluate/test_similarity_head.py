"""Logistic-regression similarity head: features, scores, and a case where it beats the distance."""

import numpy as np
import pytest

from facenet_jax.evaluate import similarity_head, verification


def anisotropic(num_ids, per_id, seed):
    """Identity information lives in 4 dimensions; 12 dimensions are large per-image noise.

    The plain distance is dominated by the noise; a head that learns to ignore those dimensions
    verifies much better.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_ids), per_id)
    signal = rng.normal(size=(num_ids, 4))[labels] + rng.normal(scale=0.3, size=(len(labels), 4))
    noise = rng.normal(scale=2.0, size=(len(labels), 12))
    return np.concatenate([signal, noise], axis=1), labels


def test_pair_features_and_scores_match_manual():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    phi = similarity_head.pair_features(a, b, ("absdiff", "product", "sqdiff"))
    for n in range(5):
        want = [abs(a[n, d] - b[n, d]) for d in range(3)]
        want += [a[n, d] * b[n, d] for d in range(3)]
        want += [(a[n, d] - b[n, d]) ** 2 for d in range(3)]
        np.testing.assert_allclose(phi[n], want)
    with pytest.raises(ValueError, match="valid: "):
        similarity_head.pair_features(a, b, ("cosine",))

    e, labels = anisotropic(30, 4, seed=1)
    head = similarity_head.fit_similarity_head(e, labels, num_pairs=2000, features=("absdiff",))
    scaler, lr = head.model[0], head.model[1]
    x = np.abs(e[:5] - e[5:10])
    logits = ((x - scaler.mean_) / scaler.scale_) @ lr.coef_[0] + lr.intercept_[0]
    np.testing.assert_allclose(similarity_head.head_distances(head, e[:5], e[5:10]), -logits)


def test_head_beats_raw_distance_on_unseen_identities():
    train_e, train_l = anisotropic(60, 5, seed=2)
    test_e, test_l = anisotropic(40, 5, seed=3)  # disjoint identities (fresh centres)
    head = similarity_head.fit_similarity_head(train_e, train_l, num_pairs=4000, seed=0)
    i, j, issame = verification.sample_pairs(test_l, 2000, seed=1)
    out = similarity_head.compare_with_distance(head, test_e, i, j, issame)
    assert set(out["head"]) == set(out["distance"])
    assert out["head"]["auc"] > out["distance"]["auc"] + 0.05
    assert out["head"]["kfold_accuracy_mean"] > out["distance"]["kfold_accuracy_mean"]
