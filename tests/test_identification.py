"""Gallery enrolment, identification with rejection, FAR and FPIR threshold calibration."""

import math
import os

import numpy as np
import pytest

from facenet_jax import identification as ident
from tests.clusters import clusters, unit


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


@pytest.mark.parametrize("calibrate_for", ["comparison", "gallery"])
def test_calibrate_gallery_sets_the_threshold_of_the_chosen_rate(calibrate_for):
    e, labels = clusters(30, 3, noise=0.8, seed=12)
    enrolled = labels < 10
    gallery = ident.enrol(e[enrolled], labels[enrolled].astype(str), "m", threshold=9.0)
    other_e, other_l = e[~enrolled], labels[~enrolled]
    calibrated, cal = ident.calibrate_gallery(gallery, other_e, other_l, 0.1, calibrate_for)
    want = (
        ident.calibrate_threshold(other_e, other_l, 0.1)
        if calibrate_for == "comparison"
        else ident.calibrate_fpir(gallery, other_e, 0.1)
    )
    assert cal == want
    assert calibrated.threshold == want["threshold"] and calibrated.target_far == 0.1
    assert calibrated.names == gallery.names and gallery.threshold == 9.0  # a copy
    with pytest.raises(ValueError, match="calibrate_for"):
        ident.calibrate_gallery(gallery, other_e, other_l, 0.1, "nope")


def test_unit_rows_is_the_models_l2_normalize():
    x = np.random.default_rng(13).normal(size=(5, 3, 7))
    x[0, 0] = 0.0  # the zero vector stays zero instead of becoming NaN
    u = ident.unit_rows(x)
    assert u.dtype == np.float32 and u.shape == x.shape
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(u, np.where(norms > 0, x / np.maximum(norms, 1e-12), 0), atol=1e-6)


# ------------------------------------------------------------------ gallery files, validated


def _bad_gallery(tmp_path, name, **entries):
    g = ident.enrol(np.eye(5, 8), list("abcde"), "model-x", threshold=0.5)
    arrays = dict(
        embeddings=g.embeddings,
        names=np.asarray(g.names),
        fingerprint=np.asarray("model-x"),
        threshold=np.float64(0.5),
    )
    arrays.update(entries)
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        np.savez(f, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_gallery_load_rejects_bad_files_naming_them(tmp_path):
    good = ident.enrol(np.eye(5, 8), list("abcde"), "model-x", threshold=0.5)
    good.save(str(tmp_path / "good.npz"))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = {
        "random.npz": "not a gallery|unreadable",
        "truncated.npz": "unreadable|not a gallery",
        "empty.npz": "unreadable|not a gallery",
        "pickled.npy": "not a gallery",
        _bad_gallery(tmp_path, "names.npz", names=np.asarray(list("abcdefghijkl"))): (
            "5 embeddings but 12 names"
        ),
        _bad_gallery(tmp_path, "nan.npz", embeddings=np.full((5, 8), np.nan, np.float32)): (
            "5 non-finite templates"
        ),
        _bad_gallery(tmp_path, "shape.npz", embeddings=np.ones(8, np.float32)): r"\[K, D\]",
        _bad_gallery(tmp_path, "norm.npz", embeddings=np.ones((5, 8), np.float32)): "unit norm",
        _bad_gallery(tmp_path, "dup.npz", names=np.asarray(list("aacde"))): "duplicate names",
        _bad_gallery(tmp_path, "t.npz", threshold=np.float64(np.nan)): "threshold",
        _bad_gallery(tmp_path, "fp.npz", fingerprint=np.zeros(3)): "fingerprint",
    }
    for name, match in cases.items():
        path = name if os.path.isabs(name) else str(tmp_path / name)
        with pytest.raises(ValueError, match=match) as info:
            ident.Gallery.load(path)
        message = str(info.value)
        assert path in message, message
        assert "allow_pickle" not in message and "\n" not in message, message
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        ident.Gallery.load(str(tmp_path / "missing.npz"))
    back = ident.Gallery.load(str(tmp_path / "good.npz"))
    with pytest.raises(ValueError, match="good.npz was enrolled with model 'model-x'"):
        back.check_fingerprint("model-y", str(tmp_path / "good.npz"))
    nameless = ident.enrol(np.eye(2), ["a", "b"])  # enrolled without a fingerprint
    with pytest.raises(ValueError, match="unknown model"):
        nameless.check_fingerprint("model-x")


def test_identify_in_blocks_equals_all_probes_at_once():
    e, labels = clusters(7, 3, seed=5)
    g = ident.enrol(e, [f"p{k}" for k in labels], threshold=0.4)
    probes = np.random.default_rng(6).normal(size=(53, 16))
    whole = ident.identify(g, probes, max_block_elements=10**9)
    for block_elements in (1, 7, 50):  # 1 probe, 1 probe (K = 7), 7 probes per block
        part = ident.identify(g, probes, max_block_elements=block_elements)
        assert part.names == whole.names
        np.testing.assert_array_equal(part.nearest, whole.nearest)
        np.testing.assert_allclose(part.distance, whole.distance, atol=1e-12)


def test_sampled_comparison_distances_in_blocks_equal_one_block():
    e, labels = clusters(20, 4, seed=7)
    one = ident.comparison_distances(e, labels, max_comparisons=300, block_elements=10**9)
    for block_elements in (1, 16, 1000):  # 1 pair per block, 1 pair (D = 16), 62 pairs
        blocks = ident.comparison_distances(
            e, labels, max_comparisons=300, block_elements=block_elements
        )
        for a, b in zip(one, blocks, strict=True):
            np.testing.assert_array_equal(a, b)
    assert len(one[0]) + len(one[1]) == 300


def test_calibration_memory_is_linear_in_the_comparisons_not_their_rows():
    """Sampled comparisons used to gather 3 x [P, D] float64 rows at once (20,000 BFW images:
    4.4 GB); in blocks the peak is about the [P] distances (here 300,000 x D = 64: 302 MiB
    before, 28 MiB now)."""
    import tracemalloc

    rng = np.random.default_rng(8)
    labels = np.repeat(np.arange(300), 10)
    e = rng.normal(size=(3000, 64)).astype(np.float32)
    tracemalloc.start()
    try:
        genuine, impostor = ident.comparison_distances(e, labels, max_comparisons=300_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(genuine) + len(impostor) == 300_000
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
