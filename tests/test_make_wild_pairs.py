"""experiments/make_wild_pairs.py: identity-disjoint LFW View-2 folds the CLI reads back."""

import os

import numpy as np
import pytest
from PIL import Image

from experiments import make_wild_pairs
from facenet_jax.evaluate import pairs as lfw


def test_pairs_are_fold_disjoint_unique_and_read_back(tmp_path):
    counts = {f"id{k:02d}": 3 + k % 4 for k in range(12)}
    folds = make_wild_pairs.make_pairs(counts, folds=3, per_fold=5, rng=np.random.default_rng(0))
    seen_ids = []
    for fold in folds:
        matched = [p for p in fold if len(p) == 3]
        mismatched = [p for p in fold if len(p) == 4]
        assert len(matched) == len(mismatched) == 5
        assert len(set(fold)) == len(fold), "no pair twice"
        ids = {p[0] for p in fold} | {p[2] for p in mismatched}
        assert all(a != b for a, _, b, _ in mismatched)
        assert all(1 <= i < j <= counts[n] for n, i, j in matched)
        assert all(1 <= i <= counts[a] and 1 <= j <= counts[b] for a, i, b, j in mismatched)
        seen_ids.append(ids)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not seen_ids[a] & seen_ids[b], "folds share no identity (LFW View 2)"

    root = tmp_path / "lfw"
    for name, n in counts.items():
        os.makedirs(root / name)
        for i in range(1, n + 1):
            (root / name / f"{name}_{i:04d}.jpg").write_bytes(b"")
    make_wild_pairs.write_pairs(str(root / "pairs.txt"), folds, 5)
    read = lfw.read_lfw_pairs(str(root / "pairs.txt"), str(root))
    assert read.num_pairs == 30
    np.testing.assert_array_equal(np.bincount(read.fold), [10, 10, 10])
    assert int(read.issame.sum()) == 15


def test_too_few_pairs_names_the_fold():
    with pytest.raises(ValueError, match="fold 0: 2 identities"):
        make_wild_pairs.make_pairs(
            {"a": 2, "b": 2}, folds=1, per_fold=5, rng=np.random.default_rng(0)
        )


def test_wild_photo_pastes_the_face_near_the_centre():
    face = Image.new("RGB", (40, 50), (255, 255, 255))
    rng = np.random.default_rng(0)
    photo = np.asarray(make_wild_pairs.wild_photo(face, None, rng, 100, (0.5, 0.5), 0.0, 0.0))
    assert photo.shape == (100, 100, 3)
    white = np.argwhere(photo.min(axis=-1) > 230)  # The face (noise sigma 6 around 255).
    (y0, x0), (y1, x1) = white.min(axis=0), white.max(axis=0)
    assert abs((y0 + y1) / 2 - 49.5) <= 1.5 and abs((x0 + x1) / 2 - 49.5) <= 1.5
    assert abs((y1 - y0 + 1) - 50) <= 2, "the face is 0.5 of the side high"
