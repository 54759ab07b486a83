"""N-way K-shot episodes: one-shot classification measured the standard (few-shot) way.

An episode draws ``way`` classes and, within each, ``shot`` support and ``queries`` query images
(disjoint). Each class's prototype is the re-normalised mean of its normalised support
embeddings, ``p_c = normalize(mean_i normalize(f(x_ci)))``; a query is classified as the class of
the nearest prototype (squared Euclidean distance). The accuracy is averaged over episodes,
with a 95% confidence interval ``1.96 * std / sqrt(episodes)`` over them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from facenet_jax.identification import unit_rows
from facenet_jax.labels import IGNORE_LABEL


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
    """Fraction of queries whose nearest class prototype is their own class.

    Args:
      embeddings: [N, D]; support: [way, shot] and query: [way, q] row indices.
    """
    e = np.asarray(embeddings)
    protos = unit_rows(unit_rows(e[support]).mean(axis=1))  # [way, D]
    q = unit_rows(e[query.reshape(-1)])  # [way * q, D]
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

    Args:
      embeddings: [N, D]; labels: [N] int class (``IGNORE_LABEL`` rows are left out).

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
