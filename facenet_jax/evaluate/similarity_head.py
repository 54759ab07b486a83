"""A learned similarity head for verification: logistic regression on pair features.

Instead of thresholding ``||f(x1) - f(x2)||^2``, a Siamese-style head scores a pair as

    P(same | x1, x2) = sigmoid(w . phi(f(x1), f(x2)) + b),

with phi the concatenation of any of ``|f1 - f2|`` ("absdiff"), ``f1 * f2`` ("product") and
``(f1 - f2)^2`` ("sqdiff"), standardised. It is trained on same/different pairs from the training
identities (scikit-learn ``LogisticRegression``) and evaluated by the same protocol as the raw
distance: ``head_distances`` returns the negative log-odds, a score where lower means "same", so
``verification.verification_metrics`` applies unchanged and the two can be compared directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from facenet_jax.evaluate import verification

FEATURES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "absdiff": lambda a, b: np.abs(a - b),
    "product": lambda a, b: a * b,
    "sqdiff": lambda a, b: (a - b) ** 2,
}


def pair_features(e1: np.ndarray, e2: np.ndarray, features: Sequence[str]) -> np.ndarray:
    """phi(e1, e2): [N, D] x [N, D] -> [N, D * len(features)] float64, features concatenated."""
    bad = [f for f in features if f not in FEATURES]
    if bad or not features:
        raise ValueError(
            f"unknown pair feature(s) {bad or list(features)}; valid: {list(FEATURES)}"
        )
    a, b = np.asarray(e1, np.float64), np.asarray(e2, np.float64)
    return np.concatenate([FEATURES[f](a, b) for f in features], axis=1)


@dataclasses.dataclass
class SimilarityHead:
    """A fitted head: ``model`` (StandardScaler + LogisticRegression) on ``features``."""

    model: Pipeline
    features: tuple[str, ...]


def fit_similarity_head(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_pairs: int = 20_000,
    features: Sequence[str] = ("absdiff", "product"),
    c: float = 1.0,
    seed: int = 0,
) -> SimilarityHead:
    """Fits the head on ``num_pairs`` pairs (half same) drawn from the labelled embeddings.

    Args:
      embeddings: [M, D] training-identity embeddings; labels: [M] identities.
      c: inverse L2 regularisation strength of the logistic regression.
    """
    i, j, issame = verification.sample_pairs(labels, num_pairs, seed)
    e = np.asarray(embeddings)
    x = pair_features(e[i], e[j], features)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    model.fit(x, issame)
    return SimilarityHead(model, tuple(features))


def head_distances(head: SimilarityHead, e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
    """Negative log-odds of "same" for each pair: [N] float64, lower = more alike."""
    return -head.model.decision_function(pair_features(e1, e2, head.features))


def compare_with_distance(
    head: SimilarityHead,
    embeddings: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    issame: np.ndarray,
    num_folds: int = 10,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``verification_metrics`` of the squared distance and of the head on the same pairs."""
    e = np.asarray(embeddings)
    return {
        "distance": verification.verification_metrics(
            verification.pair_distances(e, i, j), issame, num_folds, seed
        ),
        "head": verification.verification_metrics(
            head_distances(head, e[i], e[j]), issame, num_folds, seed
        ),
    }
