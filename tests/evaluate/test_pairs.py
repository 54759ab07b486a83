"""LFW pairs.txt / CSV reading and the leave-one-fold-out protocol."""

import os

import numpy as np
import pytest

from facenet_jax.evaluate import pairs

NAMES = {"Ann_A": 3, "Bob_B": 2, "Cid_C": 2, "Dee_D": 1}


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "lfw"
    for name, n in NAMES.items():
        (r / name).mkdir(parents=True)
        for k in range(1, n + 1):
            (r / name / f"{name}_{k:04d}.jpg").write_bytes(b"x")
    return str(r)


FOLD = [
    "Ann_A 1 2",
    "Bob_B\t1\t2",
    "Cid_C 1 2",
    "Ann_A 3 Dee_D 1",
    "Bob_B 1 Cid_C 2",
    "Dee_D 1 Ann_A 1",
]


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def path_of(root, name, k):
    return os.path.join(root, name, f"{name}_{k:04d}.jpg")


def test_lfw_with_header(tmp_path, root):
    p = write(tmp_path, "pairs.txt", ["2\t3"] + FOLD + [""] + FOLD)
    got = pairs.read_lfw_pairs(p, root)
    assert got.num_pairs == 12
    np.testing.assert_array_equal(got.issame, [1, 1, 1, 0, 0, 0] * 2)
    np.testing.assert_array_equal(got.fold, [0] * 6 + [1] * 6)
    first = [got.paths[k] for k in got.i[:6]]
    second = [got.paths[k] for k in got.j[:6]]
    assert first[0] == path_of(root, "Ann_A", 1) and second[0] == path_of(root, "Ann_A", 2)
    assert first[3] == path_of(root, "Ann_A", 3) and second[3] == path_of(root, "Dee_D", 1)
    assert len(got.paths) == len(set(got.paths)) == 8


def test_lfw_header_variants(tmp_path, root):
    headerless = pairs.read_lfw_pairs(write(tmp_path, "a.txt", FOLD * 3), root)
    np.testing.assert_array_equal(headerless.fold, np.repeat([0, 1, 2], 6))
    single = pairs.read_lfw_pairs(write(tmp_path, "b.txt", ["6"] + FOLD * 2), root)
    assert single.fold is None and single.num_pairs == 12
    spaced = pairs.read_lfw_pairs(write(tmp_path, "c.txt", ["  1   3  "] + FOLD), root)
    assert spaced.fold is None and spaced.num_pairs == 6
    one_block = pairs.read_lfw_pairs(write(tmp_path, "d.txt", FOLD), root)
    assert one_block.fold is None


def test_lfw_other_extension(tmp_path, root):
    os.rename(path_of(root, "Dee_D", 1), path_of(root, "Dee_D", 1)[:-4] + ".png")
    got = pairs.read_lfw_pairs(write(tmp_path, "p.txt", FOLD), root)
    assert path_of(root, "Dee_D", 1)[:-4] + ".png" in got.paths


@pytest.mark.parametrize(
    "bad, line_no, match",
    [
        ("Ann_A 1", 3, "expected 'name i j'"),
        ("Ann_A one 2", 3, "image number must be an integer"),
        ("a 1 b 2 c", 3, ""),
    ],
)
def test_lfw_malformed_line_reports_line_number(tmp_path, root, bad, line_no, match):
    p = write(tmp_path, "p.txt", ["1 3", FOLD[0], bad] + FOLD[2:])
    with pytest.raises(ValueError, match=f"p.txt:{line_no}: {match}"):
        pairs.read_lfw_pairs(p, root)


def test_lfw_header_mismatch(tmp_path, root):
    with pytest.raises(ValueError, match="header says 2 fold"):
        pairs.read_lfw_pairs(write(tmp_path, "p.txt", ["2 3"] + FOLD), root)


def test_missing_images_listed_and_counted(tmp_path, root):
    lines = [f"Zed_{k} 1 2" for k in range(8)] + FOLD[3:]
    with pytest.raises(FileNotFoundError) as err:
        pairs.read_lfw_pairs(write(tmp_path, "p.txt", lines), root)
    msg = str(err.value)
    assert msg.startswith("16 of ")
    assert path_of(root, "Zed_0", 1) in msg and path_of(root, "Zed_7", 2) not in msg
    got = pairs.read_lfw_pairs(write(tmp_path, "p.txt", lines), root, check_exists=False)
    assert got.num_pairs == 11


def test_csv_with_and_without_header(tmp_path, root):
    rel = [
        os.path.relpath(path_of(root, n, k), tmp_path)
        for n, k in [("Ann_A", 1), ("Ann_A", 2), ("Bob_B", 1), ("Cid_C", 1)]
    ]
    body = [
        f"{rel[0]},{rel[1]},1,0",
        f"{rel[0]},{rel[2]},0,0",
        f"{rel[2]},{rel[3]},false,1",
        f"{rel[1]},{rel[0]},same,1",
    ]
    plain = pairs.read_csv_pairs(write(tmp_path, "a.csv", body))
    np.testing.assert_array_equal(plain.issame, [1, 0, 0, 1])
    np.testing.assert_array_equal(plain.fold, [0, 0, 1, 1])
    assert plain.paths[plain.i[0]] == os.path.join(str(tmp_path), rel[0])
    assert os.path.isfile(plain.paths[plain.j[3]])
    headed = pairs.read_pairs(
        write(tmp_path, "b.csv", ["label,path2,path1"] + [f"1,{rel[1]},{rel[0]}"])
    )
    assert headed.issame.tolist() == [True] and headed.fold is None
    assert headed.paths[headed.i[0]].endswith(rel[0])


def test_csv_errors(tmp_path, root):
    a = os.path.relpath(path_of(root, "Ann_A", 1), tmp_path)
    with pytest.raises(ValueError, match="c.csv:3: label"):
        pairs.read_csv_pairs(
            write(tmp_path, "c.csv", ["path1,path2,label", f"{a},{a},1", f"{a},{a},maybe"])
        )
    with pytest.raises(ValueError, match="d.csv:1: expected"):
        pairs.read_csv_pairs(write(tmp_path, "d.csv", [f"{a},{a}"]))
    with pytest.raises(FileNotFoundError, match="1 of 2 images"):
        pairs.read_csv_pairs(write(tmp_path, "e.csv", [f"{a},nope.jpg,0"]))


def test_protocol_metrics_leave_one_fold_out():
    rng = np.random.default_rng(0)
    fold = np.repeat(np.arange(5), 40)
    y = np.tile(np.repeat([True, False], 20), 5)
    d = np.where(y, rng.normal(0.8, 0.3, 200), rng.normal(1.4, 0.3, 200))
    out = pairs.protocol_metrics(d, y, fold)
    accs = []
    for f in range(5):
        tr, te = fold != f, fold == f
        cands = np.sort(np.unique(d[tr]))
        mids = np.concatenate([[cands[0] - 1e-9], (cands[1:] + cands[:-1]) / 2, [cands[-1]]])
        scores = [np.mean((d[tr] <= t) == y[tr]) for t in mids]
        t = mids[int(np.argmax(scores))]
        accs.append(np.mean((d[te] <= t) == y[te]))
    np.testing.assert_allclose(out["fold_accuracies"], accs)
    assert out["kfold_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert out["kfold_accuracy_std"] == pytest.approx(np.std(accs))
    assert out["num_folds"] == 5 and "auc" in out and "eer" in out
    assert pairs.protocol_metrics(d, y, None, num_folds=4)["num_folds"] == 4
