"""Retrieval metrics on a labelled embedding set: Recall@k, R-precision, MAP@R.

Definitions follow pytorch-metric-learning's ``AccuracyCalculator`` with the query set equal to the
reference set (``ref_includes_query=True``): every row is a query, its neighbours are all *other*
rows ranked by Euclidean distance, and a neighbour is relevant when it carries the query's label.
For a query whose label has ``R`` other rows:

* ``Recall@k``: 1 if any of the k nearest neighbours is relevant (``Recall@1 = precision_at_1``),
* ``R-precision``: (relevant among the R nearest) / R,
* ``MAP@R``: (1/R) sum_{k=1..R} P(k) rel(k), where P(k) is the precision among the k nearest and
  rel(k) whether the k-th neighbour is relevant (Musgrave et al., "A Metric Learning Reality
  Check", 2020).

Each is averaged over queries; queries with ``R = 0`` (identities with a single row) are left out,
as in pytorch-metric-learning. The neighbours are found exactly by brute force over chunks of
queries, so memory stays at about ``max_chunk_elements`` distances whatever the set size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from facenet_jax.labels import IGNORE_LABEL


def _nearest(
    queries: np.ndarray, refs: np.ndarray, ref_sq: np.ndarray, self_idx: np.ndarray, k: int
) -> np.ndarray:
    """Indices [c, k] of the k nearest rows of ``refs`` to each query, the query itself excluded.

    Ordered by (squared distance, index); ties across the k-th place are broken arbitrarily.
    """
    d = ref_sq[None, :] - 2.0 * queries @ refs.T  # ||q||^2 is constant per row: not needed
    d[np.arange(len(queries)), self_idx] = np.inf
    if k < d.shape[1]:
        top = np.argpartition(d, k - 1, axis=1)[:, :k]
    else:
        top = np.broadcast_to(np.arange(d.shape[1]), d.shape).copy()
    top_d = np.take_along_axis(d, top, axis=1)
    order = np.lexsort((top, top_d), axis=1)
    return np.take_along_axis(top, order, axis=1)[:, :k]


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = (1, 5),
    max_chunk_elements: int = 1 << 22,
) -> dict[str, float]:
    """Recall@k, R-precision and MAP@R of the embeddings, each row a query against all others.

    Args:
      embeddings: [N, D] float (any scale; Euclidean distance is used).
      labels: [N] int identity; rows labelled ``IGNORE_LABEL`` are dropped.
      ks: the k of each ``recall_at_<k>``.
      max_chunk_elements: query rows per chunk = max(1, this // N).

    Returns:
      ``recall_at_<k>`` for each k, ``r_precision``, ``map_at_r``, ``num_queries`` (queries with
      R >= 1), ``num_lone_queries`` (left out).
    """
    e = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels).reshape(-1)
    if e.ndim != 2 or len(e) != len(labels):
        raise ValueError(
            f"embeddings [N, D] and labels [N] expected, got {e.shape}, {labels.shape}"
        )
    keep = labels != IGNORE_LABEL
    e, labels = e[keep], labels[keep]
    n = len(labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    r = counts[inverse] - 1  # relevant rows per query
    sums = {f"recall_at_{k}": 0.0 for k in ks} | {"r_precision": 0.0, "map_at_r": 0.0}
    num_queries = int((r > 0).sum())
    if num_queries == 0:
        raise ValueError(f"retrieval needs an identity with >= 2 rows; all {n} rows are alone")
    k_max = min(max(max(ks), int(r.max())), n - 1)
    ref_sq = np.einsum("nd,nd->n", e, e)
    chunk = max(1, max_chunk_elements // n)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        rows = rows[r[rows] > 0]
        if not len(rows):
            continue
        nn = _nearest(e[rows], e, ref_sq, rows, k_max)
        rel = labels[nn] == labels[rows, None]  # [c, k_max]
        rq = r[rows]
        for k in ks:
            sums[f"recall_at_{k}"] += float(rel[:, :k].any(axis=1).sum())
        within_r = np.arange(1, k_max + 1)[None, :] <= rq[:, None]
        hits = rel & within_r
        sums["r_precision"] += float((hits.sum(axis=1) / rq).sum())
        precision_at = np.cumsum(hits, axis=1) / np.arange(1, k_max + 1)
        sums["map_at_r"] += float(((precision_at * hits).sum(axis=1) / rq).sum())
    out = {name: total / num_queries for name, total in sums.items()}
    out.update(num_queries=float(num_queries), num_lone_queries=float(n - num_queries))
    return out
