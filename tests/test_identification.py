"""Gallery enrolment, identification with rejection, FAR calibration, open-set report, episodes."""

import math
import os

import numpy as np
import pytest

from facenet_jax import identification as ident


def clusters(num_ids, per_id, dim=16, noise=0.35, seed=0):
    """Unit embeddings scattered around one random unit centre per identity."""
    rng = np.random.default_rng(seed)
    centres = ident.l2_normalize(rng.normal(size=(num_ids, dim)))
    labels = np.repeat(np.arange(num_ids), per_id)
    e = centres[labels] + rng.normal(scale=noise / math.sqrt(dim), size=(len(labels), dim))
    return ident.l2_normalize(e), labels


def unit(x):
    x = np.asarray(x, float)
    return x / np.linalg.norm(x)


def test_enrol_templates_and_names():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(7, 5))
    names = ["bob", "amy", "bob", "cy", "amy", "amy", "bob"]
    g = ident.enrol(e, names, fingerprint="m1")
    assert g.names == ["amy", "bob", "cy"]
    for k, name in enumerate(g.names):
        rows = [unit(e[i]) for i in range(7) if names[i] == name]
        np.testing.assert_allclose(g.embeddings[k], unit(np.mean(rows, axis=0)), atol=1e-6)
    assert math.isinf(g.threshold) and math.isnan(g.target_far)
    with pytest.raises(ValueError, match="one name per embedding"):
        ident.enrol(e, names[:3])


def test_save_load_roundtrip_is_atomic(tmp_path):
    g = ident.enrol(np.eye(3), ["a", "b", "c"], "model-x", threshold=0.7, target_far=1e-3)
    path = str(tmp_path / "sub" / "gallery.npz")
    g.save(path)
    g.save(path)  # overwrite in place
    assert os.listdir(tmp_path / "sub") == ["gallery.npz"]
    back = ident.Gallery.load(path)
    np.testing.assert_array_equal(back.embeddings, g.embeddings)
    assert (back.names, back.fingerprint, back.threshold, back.target_far) == (
        ["a", "b", "c"],
        "model-x",
        0.7,
        1e-3,
    )
    back.check_fingerprint("model-x")
    with pytest.raises(ValueError, match="re-enrol"):
        back.check_fingerprint("model-y")
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not a gallery"):
        ident.Gallery.load(str(tmp_path / "other.npz"))


def test_identify_matches_loop_and_rejects():
    e, labels = clusters(6, 3, seed=1)
    g = ident.enrol(e, [f"p{k}" for k in labels], threshold=0.5)
    probes = np.random.default_rng(2).normal(size=(25, 16))
    res = ident.identify(g, probes)
    for m, p in enumerate(probes):
        d = [float(np.sum((unit(p) - t) ** 2)) for t in g.embeddings]
        k = int(np.argmin(d))
        assert res.nearest[m] == k
        assert res.distance[m] == pytest.approx(d[k], abs=1e-5)
        assert res.names[m] == (g.names[k] if d[k] <= 0.5 else ident.UNKNOWN)
    assert ident.UNKNOWN in res.names and not res.accepted.all()
    assert ident.identify(g, probes, threshold=np.inf).accepted.all()


def test_comparison_distances_exact_and_sampled():
    e, labels = clusters(4, 3, seed=3)
    genuine, impostor = ident.comparison_distances(e, labels)
    slow_g, slow_i = [], []
    for a in range(12):
        for b in range(a + 1, 12):
            d = float(np.sum((e[a].astype(float) - e[b]) ** 2))
            (slow_g if labels[a] == labels[b] else slow_i).append(d)
    np.testing.assert_allclose(np.sort(genuine), np.sort(slow_g), atol=1e-6)
    np.testing.assert_allclose(np.sort(impostor), np.sort(slow_i), atol=1e-6)
    g2, i2 = ident.comparison_distances(e, labels, max_comparisons=40)
    assert len(g2) == len(i2) == 20


@pytest.mark.parametrize("target", [0.0, 0.05, 0.1, 0.5, 1.0])
def test_threshold_for_far_is_largest_valid(target):
    imp = np.round(np.random.default_rng(4).uniform(0, 2, 40), 1)  # with ties
    t, far = ident.threshold_for_far(imp, target)
    assert far == pytest.approx(np.mean(imp <= t)) and far <= target
    larger = imp[imp > t]
    if len(larger):  # the next distinct distance would exceed the target
        assert np.mean(imp <= larger.min()) > target


def test_calibrated_far_holds_on_held_out_impostors():
    target = 1e-2
    val_e, val_l = clusters(100, 4, seed=10)
    test_e, test_l = clusters(100, 4, seed=11)  # other identities, same distribution
    cal = ident.calibrate_threshold(val_e, val_l, target)
    assert cal["far_reached"] <= target and cal["num_impostor_comparisons"] == 400 * 396 / 2
    _, held_out = ident.comparison_distances(test_e, test_l)
    far = np.mean(held_out <= cal["threshold"])
    # Comparisons share images and identities, so count the 4,950 identity pairs (not the
    # 79,200 image pairs) as the independent samples: a conservative binomial standard error.
    se = math.sqrt(target * (1 - target) / (100 * 99 / 2))
    assert abs(far - target) < 3 * se
    assert 0 < cal["tar"] <= 1


def test_open_set_report_against_loop():
    e, labels = clusters(10, 4, noise=0.9, seed=5)
    names = np.array([f"id{k}" for k in labels])
    enrol_idx, known, strangers = ident.split_open_set(labels, 1, 0.5, seed=0)
    assert len(enrol_idx) == 5 and len(set(labels[enrol_idx])) == 5
    assert not set(labels[strangers]) & set(labels[enrol_idx])
    assert set(labels[known]) == set(labels[enrol_idx])
    assert len(set(enrol_idx) | set(known) | set(strangers)) == 40
    g = ident.enrol(e[enrol_idx], names[enrol_idx], threshold=0.6)
    probes = np.concatenate([known, strangers])
    rep = ident.open_set_report(g, e[probes], names[probes])
    top1, dir_, frr, far = [], [], [], []
    for p in probes:
        d = [float(np.sum((e[p] - t) ** 2)) for t in g.embeddings]
        k = int(np.argmin(d))
        ok, acc = g.names[k] == names[p], d[k] <= 0.6
        if names[p] in g.names:
            top1.append(ok)
            dir_.append(ok and acc)
            frr.append(not acc)
        else:
            far.append(acc)
    assert rep["top1_accuracy"] == pytest.approx(np.mean(top1))
    assert rep["detection_identification_rate"] == pytest.approx(np.mean(dir_))
    assert rep["false_reject_rate"] == pytest.approx(np.mean(frr))
    assert rep["stranger_far"] == pytest.approx(np.mean(far))
    assert rep["num_stranger_probes"] == len(strangers) == 20


def test_open_set_protocol_separable():
    e, labels = clusters(200, 3, noise=0.3, seed=6)
    rep = ident.open_set_protocol(e, labels, target_far=1e-3, shots=1)
    assert rep["top1_accuracy"] == 1.0 and rep["detection_identification_rate"] == 1.0
    assert rep["calibration_far_reached"] <= 1e-3 and rep["num_enrolled"] == 50
    # A stranger is accepted if any of the 50 templates is within the threshold: about
    # 1 - (1 - FAR)^50 = 0.05 here, far below the 1.0 of an uncalibrated (infinite) threshold.
    assert rep["stranger_far"] < 0.25


def test_episode_accuracy_matches_loop():
    e, labels = clusters(8, 6, noise=1.2, seed=7)
    by_class = [np.flatnonzero(labels == c) for c in range(8)]
    rng = np.random.default_rng(0)
    support, query = ident.sample_episode(by_class, 5, 2, 3, rng)
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
    assert ident.episode_accuracy(e, support, query) == pytest.approx(np.mean(correct))


def test_episodes_chance_and_perfect():
    e, labels = clusters(30, 3, noise=0.05, seed=8)
    perfect = ident.episodes(e, labels, way=20, shot=1, num_episodes=50)
    assert perfect["accuracy"] == 1.0 and perfect["ci95"] == 0.0
    # Random embeddings: chance level. The CI is over episodes for these fixed embeddings; with
    # 1,000 images re-used across episodes there is a little extra variance, hence 4 sigma.
    rand = np.random.default_rng(9).normal(size=(1000, 16))
    chance = ident.episodes(rand, np.repeat(np.arange(500), 2), way=5, shot=1, num_episodes=400)
    assert abs(chance["accuracy"] - 0.2) < 4 * chance["ci95"] / 1.96
    assert ident.episodes(e, labels, 5, 1, 30, seed=3) == ident.episodes(
        e, labels, 5, 1, 30, seed=3
    )
    with pytest.raises(ValueError, match="need 31 classes"):
        ident.episodes(e, labels, way=31, shot=1)


def test_calibrate_fpir_matches_nearest_template_brute_force():
    e, labels = clusters(30, 3, noise=0.8, seed=11)
    enrolled = labels < 20
    gallery = ident.enrol(e[enrolled], labels[enrolled].astype(str))
    strangers = e[~enrolled]
    cal = ident.calibrate_fpir(gallery, strangers, 0.2)
    nearest = [min(np.sum((unit(s) - t) ** 2) for t in gallery.embeddings) for s in strangers]
    nearest = np.sort(nearest)
    accepted = nearest <= cal["threshold"]
    assert cal["fpir_reached"] == pytest.approx(accepted.mean()) and accepted.mean() <= 0.2
    assert accepted.sum() == int(0.2 * len(strangers))  # the largest threshold within target
    assert cal["num_strangers"] == len(strangers) == 30


def test_fpir_calibration_holds_the_stranger_rate_where_per_comparison_far_does_not():
    # 75 enrolled people, 1 shot each: a threshold for a 5% per-comparison FAR accepts almost
    # every stranger (~1 - 0.95^75); calibrated for FPIR it accepts ~5% of held-out strangers.
    e, labels = clusters(300, 4, noise=0.6, seed=3)
    rep = ident.open_set_protocol(e, labels, target_far=0.05, shots=1)
    assert rep["stranger_far"] > 0.5
    fpir = rep["fpir_calibrated"]
    assert fpir["calibration_fpir_reached"] <= 0.05
    assert fpir["stranger_fpir"] < 0.1
    assert fpir["threshold"] < rep["threshold"]
