"""Retrieval metrics against a slow per-query reference."""

import numpy as np
import pytest

from facenet_jax.data.sampling import IGNORE_LABEL
from facenet_jax.evaluate import retrieval


def slow_metrics(e, labels, ks):
    out = {f"recall_at_{k}": [] for k in ks} | {"r_precision": [], "map_at_r": []}
    for q in range(len(e)):
        others = [j for j in range(len(e)) if j != q]
        dist = [float(np.sqrt(np.sum((e[j] - e[q]) ** 2))) for j in others]
        ranked = [others[t] for t in np.argsort(dist, kind="stable")]
        rel = [labels[j] == labels[q] for j in ranked]
        big_r = sum(labels[j] == labels[q] for j in others)
        if big_r == 0:
            continue
        for k in ks:
            out[f"recall_at_{k}"].append(float(any(rel[:k])))
        out["r_precision"].append(sum(rel[:big_r]) / big_r)
        ap = 0.0
        for k in range(1, big_r + 1):
            if rel[k - 1]:
                ap += sum(rel[:k]) / k
        out["map_at_r"].append(ap / big_r)
    return {name: float(np.mean(v)) for name, v in out.items()}


@pytest.mark.parametrize("chunk", [1 << 22, 50, 1])
def test_matches_slow_reference(chunk):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 9, 70)
    labels[:3] = [20, 21, 22]  # lone queries
    centres = rng.normal(size=(23, 6))
    e = centres[labels] + rng.normal(scale=0.9, size=(70, 6))
    got = retrieval.retrieval_metrics(e, labels, ks=(1, 2, 5), max_chunk_elements=chunk)
    want = slow_metrics(e, labels, (1, 2, 5))
    for name, v in want.items():
        assert got[name] == pytest.approx(v), name
    assert got["num_queries"] == 67 and got["num_lone_queries"] == 3


def test_perfect_and_ignored_rows():
    labels = np.repeat(np.arange(4), 5)
    e = np.eye(4)[labels] * 10 + np.random.default_rng(1).normal(scale=0.01, size=(20, 4))
    labels_padded = np.concatenate([labels, [IGNORE_LABEL] * 3])
    e_padded = np.concatenate([e, np.zeros((3, 4))])
    got = retrieval.retrieval_metrics(e_padded, labels_padded)
    assert got["map_at_r"] == got["r_precision"] == got["recall_at_1"] == 1.0
    assert got["num_queries"] == 20


def test_errors():
    with pytest.raises(ValueError, match="alone"):
        retrieval.retrieval_metrics(np.zeros((3, 2)), np.arange(3))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        retrieval.retrieval_metrics(np.zeros((3, 2)), np.arange(4))
