"""N-way K-shot episodes: sampling, nearest-prototype accuracy against a loop, chance level."""

import numpy as np
import pytest

from facenet_jax.evaluate import episodes
from tests.clusters import clusters, unit


def test_episode_accuracy_matches_loop():
    e, labels = clusters(8, 6, noise=1.2, seed=7)
    by_class = [np.flatnonzero(labels == c) for c in range(8)]
    rng = np.random.default_rng(0)
    support, query = episodes.sample_episode(by_class, 5, 2, 3, rng)
    assert len(set(labels[support[:, 0]])) == 5
    assert (labels[support] == labels[support[:, :1]]).all()
    assert (labels[query] == labels[support[:, :1]]).all()
    assert not set(support.ravel()) & set(query.ravel())
    protos = [unit(np.mean([unit(e[i]) for i in row], axis=0)) for row in support]
    correct = []
    for w, row in enumerate(query):
        for i in row:
            d = [np.sum((unit(e[i]) - p) ** 2) for p in protos]
            correct.append(int(np.argmin(d)) == w)
    assert episodes.episode_accuracy(e, support, query) == pytest.approx(np.mean(correct))


def test_episodes_chance_and_perfect():
    e, labels = clusters(30, 3, noise=0.05, seed=8)
    perfect = episodes.episodes(e, labels, way=20, shot=1, num_episodes=50)
    assert perfect["accuracy"] == 1.0 and perfect["ci95"] == 0.0
    # Random embeddings: chance level. The CI is over episodes for these fixed embeddings; with
    # 1,000 images re-used across episodes there is a little extra variance, hence 4 sigma.
    rand = np.random.default_rng(9).normal(size=(1000, 16))
    chance = episodes.episodes(rand, np.repeat(np.arange(500), 2), way=5, shot=1, num_episodes=400)
    assert abs(chance["accuracy"] - 0.2) < 4 * chance["ci95"] / 1.96
    assert episodes.episodes(e, labels, 5, 1, 30, seed=3) == episodes.episodes(
        e, labels, 5, 1, 30, seed=3
    )
    with pytest.raises(ValueError, match="need 31 classes"):
        episodes.episodes(e, labels, way=31, shot=1)
