"""The CLI on a tiny trained run: every subcommand's --json output, checked independently."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy.interpolate import interp1d
from scipy.optimize import brentq

from facenet_jax import cli, identification, inference, train
from facenet_jax.data import preprocessing
from facenet_jax.evaluate import episodes, retrieval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IDS, PER_ID = 8, 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run trained for a few steps of the smoke config (seconds)."""
    from configs import smoke

    config = smoke.get_config()
    config.train.num_steps = 4
    wd = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(config, wd)
    return wd


_EMBEDDERS = {}


@pytest.fixture(autouse=True)
def cached_embedder(monkeypatch):
    """Restores each run once per session: restoring and compiling costs seconds per call."""
    real = inference.load_embedder

    def load(workdir, step=None):
        if (workdir, step) not in _EMBEDDERS:
            _EMBEDDERS[workdir, step] = real(workdir, step)
        return _EMBEDDERS[workdir, step]

    monkeypatch.setattr(inference, "load_embedder", load)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """ROOT/grouped/<group>/Person_k/Person_k_000i.jpg from scikit-learn's digits (class k is
    person k), and the same images without the group level under ROOT/flat."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("faces")
    for k in range(NUM_IDS):
        name = f"Person_{k}"
        folder = root / "grouped" / f"group{k % 2}" / name
        folder.mkdir(parents=True)
        for n, img in enumerate(digits.images[digits.target == k][:PER_ID], start=1):
            arr = (img * (255 / 16)).astype(np.uint8)
            Image.fromarray(arr).resize((32, 32), Image.BILINEAR).save(
                folder / f"{name}_{n:04d}.jpg", quality=95
            )
    flat = root / "flat"  # ROOT/Person_k/... without the group level
    flat.mkdir()
    for k in range(NUM_IDS):
        shutil.copytree(root / "grouped" / f"group{k % 2}" / f"Person_{k}", flat / f"Person_{k}")
    return root


def image(tree, k, n):
    return str(tree / "flat" / f"Person_{k}" / f"Person_{k}_{n:04d}.jpg")


def embed(workdir, paths):
    """Embeddings computed directly with inference + preprocessing, not through the CLI."""
    emb = inference.load_embedder(workdir)
    x = np.stack([preprocessing.load_image(p, emb.spec) for p in paths])
    return emb.embed(x, 256), emb


def run(args, capsys):
    code = cli.main([*args, "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_embed_and_verify(workdir, tree, capsys, tmp_path):
    out = run(
        ["embed", str(tree / "flat"), "--workdir", workdir, "--out", str(tmp_path / "e.npz")],
        capsys,
    )
    assert out["num_images"] == NUM_IDS * PER_ID and out["num_identities"] == NUM_IDS
    z = np.load(tmp_path / "e.npz")
    paths = [str(tree / "flat" / p) for p in z["paths"]]
    want, emb = embed(workdir, paths)
    np.testing.assert_allclose(z["embeddings"], want, atol=1e-5)
    assert list(z["names"]) == [os.path.basename(os.path.dirname(p)) for p in paths]
    assert str(z["fingerprint"]) == emb.fingerprint == out["fingerprint"]

    a, b = image(tree, 0, 1), image(tree, 3, 2)
    v = run(["verify", a, b, "--workdir", workdir], capsys)
    (ea, eb), _ = embed(workdir, [a, b])
    assert v["distance"] == pytest.approx(float(np.sum((ea - eb) ** 2)), abs=1e-5)
    with open(os.path.join(workdir, "eval.json")) as f:
        assert v["threshold"] == json.load(f)["trained"]["threshold"]
    assert v["same"] == (v["distance"] <= v["threshold"])
    strict = run(["verify", a, a, "--workdir", workdir, "--threshold", "1e-6"], capsys)
    assert strict["same"] and strict["distance"] < 1e-6


def test_enroll_identify_with_rejection(workdir, tree, capsys, tmp_path):
    gallery_dir = tmp_path / "staff"  # one photo per person: staff/<name>.jpg
    gallery_dir.mkdir()
    for k in range(4):
        shutil.copy(image(tree, k, 1), gallery_dir / f"Person_{k}.jpg")
    gal = str(tmp_path / "g.npz")
    out = run(
        ["enroll", str(gallery_dir), "--workdir", workdir, "--out", gal, "--threshold", "1e-4"],
        capsys,
    )
    assert out["num_identities"] == 4 and out["threshold"] == 1e-4
    probes = [image(tree, 2, 1), image(tree, 6, 1), image(tree, 7, 3)]
    res = run(["identify", *probes, "--workdir", workdir, "--gallery", gal], capsys)["results"]
    # The enrolled photo itself is recognised; strangers are rejected.
    assert res[0]["name"] == "Person_2" and res[0]["accepted"] and res[0]["distance"] < 1e-4
    assert [r["name"] for r in res[1:]] == ["unknown", "unknown"]
    e, _ = embed(workdir, probes)
    g = identification.Gallery.load(gal)
    for r, p in zip(res, e, strict=True):
        assert r["distance"] == pytest.approx(np.min(np.sum((g.embeddings - p) ** 2, 1)), abs=1e-5)

    # Calibration on other identities (Person_4..7) for a target FAR.
    calib = tmp_path / "calib"
    for k in range(4, NUM_IDS):
        shutil.copytree(tree / "flat" / f"Person_{k}", calib / f"Person_{k}")
    cal = run(
        [
            "enroll",
            str(gallery_dir),
            "--workdir",
            workdir,
            "--out",
            gal,
            "--calibrate",
            str(calib),
            "--far",
            "0.1",
        ],
        capsys,
    )
    paths = sorted(str(p) for p in calib.rglob("*.jpg"))
    ce, _ = embed(workdir, paths)
    labels = [os.path.basename(os.path.dirname(p)) for p in paths]
    want = identification.calibrate_threshold(ce, np.unique(labels, return_inverse=True)[1], 0.1)
    assert cal["threshold"] == pytest.approx(want["threshold"], abs=1e-5)
    assert cal["calibration"]["far_reached"] <= 0.1
    g = identification.Gallery.load(gal)
    assert g.threshold == cal["threshold"] and g.target_far == 0.1

    # Calibrated for this gallery (FPIR): the calibration people are strangers to it.
    fpir = run(
        ["enroll", str(gallery_dir), "--workdir", workdir, "--out", gal]
        + ["--calibrate", str(calib), "--far", "0.25", "--calibrate-for", "gallery"],
        capsys,
    )
    want = identification.calibrate_fpir(identification.Gallery.load(gal), ce, 0.25)
    assert fpir["threshold"] == pytest.approx(want["threshold"], abs=1e-5)
    assert fpir["calibration"]["fpir_reached"] <= 0.25

    # A gallery from another model is refused.
    identification.Gallery(g.embeddings, g.names, "other-model", 1.0).save(gal)
    assert cli.main(["identify", probes[0], "--workdir", workdir, "--gallery", gal]) == 2
    assert "re-enrol" in capsys.readouterr().err


def _slow_best(d, y):
    u = np.unique(d)
    cands = np.concatenate([[u[0] - 1e-9], (u[1:] + u[:-1]) / 2, [u[-1]]])
    accs = [np.mean((d <= t) == y) for t in cands]
    return cands[int(np.argmax(accs))], max(accs)


def test_evaluate_lfw_pairs_matches_independent_metrics(workdir, tree, capsys, tmp_path):
    rng = np.random.default_rng(0)
    lines, expected = ["2\t8"], []
    for _ in range(2):
        for _ in range(8):
            k, (a, b) = rng.integers(NUM_IDS), rng.choice(np.arange(1, PER_ID + 1), 2, False)
            lines.append(f"Person_{k}\t{a}\t{b}")
            expected.append((image(tree, k, a), image(tree, k, b), True))
        for _ in range(8):
            k1, k2 = rng.choice(NUM_IDS, 2, replace=False)
            a, b = rng.integers(1, PER_ID + 1, 2)
            lines.append(f"Person_{k1}\t{a}\tPerson_{k2}\t{b}")
            expected.append((image(tree, k1, a), image(tree, k2, b), False))
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    out_dir = str(tmp_path / "eval")
    m = run(
        [
            "evaluate",
            "--workdir",
            workdir,
            "--pairs",
            str(tmp_path / "pairs.txt"),
            "--root",
            str(tree / "flat"),
            "--output-dir",
            out_dir,
        ],
        capsys,
    )
    with open(os.path.join(out_dir, "metrics.json")) as f:
        assert json.load(f)["accuracy"] == m["accuracy"]
    for name in ("roc.png", "distances.png"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0

    # The CLI's pair distances equal the directly computed ones ...
    z = np.load(os.path.join(out_dir, "pairs.npz"))
    e1, _ = embed(workdir, [a for a, _, _ in expected])
    e2, _ = embed(workdir, [b for _, b, _ in expected])
    np.testing.assert_allclose(z["distances"], np.sum((e1 - e2) ** 2, 1), atol=1e-5)
    y = np.array([s for _, _, s in expected])
    np.testing.assert_array_equal(z["issame"], y)
    np.testing.assert_array_equal(z["fold"], np.repeat([0, 1], 16))
    # ... and the metrics equal slow references on those distances.
    d = z["distances"]
    _, acc = _slow_best(d, y)
    assert m["accuracy"] == pytest.approx(acc)
    pos, neg = d[y], d[~y]
    assert m["auc"] == pytest.approx(
        np.mean((neg[None] > pos[:, None]) + 0.5 * (neg[None] == pos[:, None]))
    )
    ts = np.concatenate([[-np.inf], np.unique(d)])
    far = np.array([np.mean(neg <= t) for t in ts])
    tar = np.array([np.mean(pos <= t) for t in ts])
    assert m["eer"] == pytest.approx(brentq(lambda x: 1 - x - interp1d(far, tar)(x), 0, 1))
    assert m["tar_at_far_1e-2"] == pytest.approx(tar[far <= 1e-2].max())
    folds = []
    for f in (0, 1):
        t, _ = _slow_best(d[z["fold"] != f], y[z["fold"] != f])
        folds.append(np.mean((d[z["fold"] == f] <= t) == y[z["fold"] == f]))
    np.testing.assert_allclose(m["fold_accuracies"], folds)
    assert m["kfold_accuracy_mean"] == pytest.approx(np.mean(folds))

    # The same pairs as a CSV (relative paths, no folds: KFold).
    rows = [
        f"{os.path.relpath(a, tmp_path)},{os.path.relpath(b, tmp_path)},{int(s)}"
        for a, b, s in expected
    ]
    (tmp_path / "pairs.csv").write_text("path1,path2,label\n" + "\n".join(rows) + "\n")
    c = run(
        [
            "evaluate",
            "--workdir",
            workdir,
            "--csv",
            str(tmp_path / "pairs.csv"),
            "--folds",
            "4",
            "--output-dir",
            str(tmp_path / "csv"),
        ],
        capsys,
    )
    assert c["accuracy"] == pytest.approx(m["accuracy"]) and c["num_folds"] == 4


def test_evaluate_reports_bad_pairs_file(workdir, tree, capsys, tmp_path):
    (tmp_path / "pairs.txt").write_text("1 1\nPerson_0 1 2\nPerson_0 x Person_1 1\n")
    code = cli.main(
        [
            "evaluate",
            "--workdir",
            workdir,
            "--pairs",
            str(tmp_path / "pairs.txt"),
            "--root",
            str(tree / "flat"),
        ]
    )
    assert code == 2 and "pairs.txt:3:" in capsys.readouterr().err


def test_evaluate_tree_with_groups(workdir, tree, capsys, tmp_path):
    out_dir = str(tmp_path / "tree")
    m = run(
        [
            "evaluate",
            "--workdir",
            workdir,
            "--root",
            str(tree / "grouped"),
            "--group-depth",
            "1",
            "--num-pairs",
            "300",
            "--far",
            "0.1",
            "--output-dir",
            out_dir,
            "--crop",
            "none",
            "--head-train",
            str(tree / "grouped"),
        ],
        capsys,
    )
    assert set(m["groups"]["groups"]) == {"group0", "group1"}
    assert m["negative_pairs"] == "within group"
    assert set(m["similarity_head"]) == set(m["verification"])
    assert m["num_images"] == NUM_IDS * PER_ID and m["num_identities"] == NUM_IDS
    paths = sorted(str(p) for p in tree.glob("grouped/*/*/*.jpg"))
    e, _ = embed(workdir, paths)
    labels = np.unique([os.path.dirname(p) for p in paths], return_inverse=True)[1]
    want = retrieval.retrieval_metrics(e, labels)
    assert m["retrieval"]["map_at_r"] == pytest.approx(want["map_at_r"], abs=1e-6)
    assert m["open_set"]["calibration_far_reached"] <= 0.1
    for p in m["plots"]:
        assert os.path.isfile(p)
    assert {"group_accuracy.png", "group_far.png", "embeddings.png"} <= set(os.listdir(out_dir))
    # The same tree with impostors from any identity: other pairs, groups still reported.
    anyone = run(
        ["evaluate", "--workdir", workdir, "--root", str(tree / "grouped"), "--group-depth", "1"]
        + ["--num-pairs", "300", "--impostors", "any", "--output-dir", out_dir + "_any"],
        capsys,
    )
    assert anyone["negative_pairs"] == "any identity"
    assert set(anyone["groups"]["groups"]) == {"group0", "group1"}
    assert anyone["verification"]["auc"] != m["verification"]["auc"]


def m_args(workdir, config):
    """The CLI arguments that redo a run's final evaluation: same split, pairs, seed and folds."""
    e = config["eval"]
    return ["--workdir", workdir, "--split", "test", "--num-pairs", str(e["num_pairs"])] + [
        "--folds",
        str(e["num_folds"]),
        "--seed",
        str(config["seed"]),
    ]


def test_evaluate_split_reproduces_the_runs_own_evaluation(workdir, capsys, tmp_path):
    with open(os.path.join(workdir, "eval.json")) as f:
        trained = json.load(f)["trained"]
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    # The training run's final evaluation: config.eval.num_pairs pairs of the test split drawn
    # with config.seed, config.eval.num_folds folds; the CLI redoes it from the checkpoint.
    m = run(
        [
            "evaluate",
            "--workdir",
            workdir,
            "--split",
            "test",
            "--num-pairs",
            str(config["eval"]["num_pairs"]),
            "--folds",
            str(config["eval"]["num_folds"]),
            "--seed",
            str(config["seed"]),
            "--output-dir",
            str(tmp_path / "split"),
        ],
        capsys,
    )
    assert m["split"] == "test" and m["num_images"] == trained["num_images"]
    assert m["num_identities"] == trained["num_identities"]
    # The same embedder, batches, pairs and folds as the run: its numbers, exactly.
    v = m["verification"]
    assert v == {k: trained[k] for k in v}
    assert os.path.isfile(os.path.join(tmp_path, "split", "metrics.json"))
    with open(os.path.join(workdir, "eval.json")) as f:
        untrained = json.load(f)["untrained"]
    base = run(["evaluate", *m_args(workdir, config), "--untrained"], capsys)
    assert base["verification"] == {k: untrained[k] for k in base["verification"]}
    assert base["fingerprint"].startswith(f"{config['model']['name']}-step0-")
    assert base["verification"]["auc"] != pytest.approx(v["auc"], abs=1e-4)  # not the same net
    assert cli.main(["evaluate", "--workdir", workdir, "--split", "nope", "--json"]) == 2
    assert "unknown split 'nope'" in capsys.readouterr().err


def test_episodes(workdir, tree, capsys, tmp_path):
    out = run(
        [
            "episodes",
            "--workdir",
            workdir,
            "--root",
            str(tree / "flat"),
            "--way",
            "5",
            "--shot",
            "1",
            "--episodes",
            "40",
            "--output-dir",
            str(tmp_path),
        ],
        capsys,
    )
    paths = sorted(str(p) for p in (tree / "flat").glob("*/*.jpg"))
    e, _ = embed(workdir, paths)
    labels = np.unique([os.path.dirname(p) for p in paths], return_inverse=True)[1]
    want = episodes.episodes(e, labels, 5, 1, 40)
    assert out["accuracy"] == pytest.approx(want["accuracy"], abs=0.03)
    assert out["way"] == 5 and out["num_episodes"] == 40
    assert os.path.isfile(tmp_path / "episodes_5way_1shot.json")
    # The same tree inside a zip archive (Omniglot's layout) gives the same episodes.
    archive = shutil.make_archive(str(tmp_path / "faces"), "zip", tree, "flat")
    zipped = run(
        [
            "episodes",
            "--workdir",
            workdir,
            "--root",
            os.path.join(archive, "flat"),
            "--way",
            "5",
            "--episodes",
            "40",
            "--output-dir",
            str(tmp_path / "zip"),
        ],
        capsys,
    )
    assert zipped["accuracy"] == out["accuracy"] and zipped["num_images"] == NUM_IDS * PER_ID


def test_module_entry_point_help():
    proc = subprocess.run(
        [sys.executable, "-m", "facenet_jax.cli", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    for name in cli.COMMANDS:
        assert name in proc.stdout


# ------------------------------------------------------------------ user errors, thresholds


def fails(args, capsys):
    """Runs a command that must fail: exit 2 and one stderr line; returns that line."""
    code = cli.main(args)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_thresholds_belong_to_the_network_evaluated(workdir, tree, capsys):
    a, b = image(tree, 0, 1), image(tree, 3, 2)
    with open(os.path.join(workdir, "eval.json")) as f:
        record = json.load(f)
    untrained = run(["verify", a, b, "--workdir", workdir, "--untrained"], capsys)
    assert untrained["threshold"] == record["untrained"]["threshold"]
    assert untrained["threshold"] != record["trained"]["threshold"]
    # Step 3 is another network than the final step 4: no threshold of its own in eval.json.
    line = fails(["verify", a, b, "--workdir", workdir, "--step", "3"], capsys)
    assert "--step 3" in line and "pass --threshold" in line and "step 4" in line
    line = fails(
        ["enroll", str(tree / "flat"), "--workdir", workdir, "--out", "x.npz"] + ["--step", "3"],
        capsys,
    )
    assert "pass --threshold" in line
    own = run(["verify", a, b, "--workdir", workdir, "--step", "3", "--threshold", "0.5"], capsys)
    assert own["threshold"] == 0.5 and own["same"] == (own["distance"] <= 0.5)
    final = run(["verify", a, b, "--workdir", workdir, "--step", "4"], capsys)
    assert final["threshold"] == record["trained"]["threshold"]


def test_a_wrong_workdir_is_named_not_the_threshold(workdir, tree, tmp_path, capsys):
    a = image(tree, 0, 1)
    line = fails(["verify", a, a, "--workdir", str(tmp_path / "nope")], capsys)
    assert "--workdir" in line and "does not exist" in line and "--threshold" not in line
    line = fails(["verify", a, a, "--workdir", str(tmp_path)], capsys)
    assert "holds no run" in line and "--threshold" not in line
    unfinished = tmp_path / "unfinished"  # A run without its final evaluation.
    unfinished.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), unfinished / "config.json")
    line = fails(["verify", a, a, "--workdir", str(unfinished)], capsys)
    assert "eval.json does not exist" in line and "pass --threshold" in line


def test_cli_errors_name_cli_arguments_and_hide_tracebacks(workdir, tree, tmp_path, capsys):
    missing = str(tmp_path / "no-such-folder")
    line = fails(
        ["enroll", missing, "--workdir", workdir, "--out", "g.npz", "--threshold", "1"], capsys
    )
    assert "FOLDER" in line and "config.data" not in line and missing in line
    assert "--verbosity=1 shows the traceback" in line
    line = fails(["evaluate", "--workdir", workdir, "--root", missing], capsys)
    assert "--root" in line and "config.data" not in line
    # A gallery of 5 embeddings and 12 names: one line naming the file.
    gal = str(tmp_path / "bad.npz")
    np.savez(
        gal,
        embeddings=np.eye(5, 8, dtype=np.float32),
        names=np.asarray(list("abcdefghijkl")),
        fingerprint=np.asarray("m"),
        threshold=np.float64(1.0),
    )
    args = ["identify", image(tree, 0, 1), "--workdir", workdir, "--gallery", gal]
    line = fails(args, capsys)
    assert gal in line and "5 embeddings but 12 names" in line
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(1000))
    line = fails([*args[:-1], str(tmp_path / "random.npz")], capsys)
    assert "random.npz" in line and "allow_pickle" not in line
    with pytest.raises(ValueError, match="5 embeddings but 12 names"):  # The traceback, asked.
        cli.main([*args, "--verbosity", "1"])


def test_the_runs_eval_flip_is_every_commands_default(workdir, tree, capsys, caplog, tmp_path):
    # The same weights with config.eval.flip = True (a copy of the run): its commands average
    # with the mirror image unless told --no-flip, exactly as --flip / nothing on the original.
    flipping = str(tmp_path / "flipping_run")
    shutil.copytree(workdir, flipping)
    with open(os.path.join(flipping, "config.json")) as f:
        config = json.load(f)
    assert config["eval"]["flip"] is False  # The smoke run keeps the default.
    config["eval"]["flip"] = True
    with open(os.path.join(flipping, "config.json"), "w") as f:
        json.dump(config, f)
    args = ["evaluate", "--root", str(tree / "flat"), "--output-dir", str(tmp_path / "out")]
    default = run([*args, "--workdir", flipping], capsys)
    mirrored = run([*args, "--workdir", workdir, "--flip"], capsys)
    off = run([*args, "--workdir", flipping, "--no-flip"], capsys)
    plain = run([*args, "--workdir", workdir], capsys)
    assert default["flip"] and mirrored["flip"] and not off["flip"] and not plain["flip"]
    assert default["verification"] == mirrored["verification"]
    assert off["verification"] == plain["verification"]
    assert default["verification"] != plain["verification"]
    # verify applies the run's threshold, measured in the run's mode: another mode is warned of.
    pair = ["verify", "--workdir", flipping, image(tree, 0, 1), image(tree, 0, 2)]
    with caplog.at_level("WARNING", logger="facenet_jax.cli"):
        run(pair, capsys)
        assert "mirror averaging" not in caplog.text
        run([*pair, "--no-flip"], capsys)
    assert "the run's threshold was measured with mirror averaging" in caplog.text


def test_stdout_holds_only_the_json_while_libraries_print(workdir, capsys, monkeypatch, tmp_path):
    # tfds prints "Downloading and preparing dataset ..." on stdout when a folder is prepared:
    # with --json the output must still be one JSON object, the library's line on stderr.
    real = inference.run_dataset

    def chatty(config, root=None):
        print("Downloading and preparing dataset (a library's print)")
        return real(config, root)

    monkeypatch.setattr(inference, "run_dataset", chatty)
    out = ["--output-dir", str(tmp_path / "o")]
    m = run(["evaluate", "--workdir", workdir, "--split", "test", *out], capsys)
    assert m["split"] == "test"
    code = cli.main(["evaluate", "--workdir", workdir, "--split", "test", "--json", *out])
    captured = capsys.readouterr()
    assert code == 0 and "a library's print" in captured.err
    assert json.loads(captured.out)["split"] == "test"


def test_a_gallery_is_used_only_with_probes_embedded_its_way(workdir, tree, capsys, tmp_path):
    # Mirror-averaged templates are another embedding: probes must be embedded the same way.
    staff = tmp_path / "staff"
    staff.mkdir()
    for k in range(3):
        shutil.copy(image(tree, k, 1), staff / f"Person_{k}.jpg")
    gal = str(tmp_path / "flipped.npz")
    enrol = ["enroll", str(staff), "--workdir", workdir, "--out", gal, "--threshold", "0.5"]
    run([*enrol, "--flip"], capsys)
    probe = ["identify", image(tree, 1, 1), "--workdir", workdir, "--gallery", gal]
    line = fails([*probe, "--json"], capsys)
    assert "+flip" in line and "re-enrol" in line
    (found,) = run([*probe, "--flip"], capsys)["results"]
    assert found["name"] == "Person_1" and found["distance"] < 1e-6  # The enrolled photo itself.
