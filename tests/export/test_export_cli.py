"""``facenet-jax export`` on a tiny trained run, then the CLI with ``--model``: the exported
model embeds files, verifies and evaluates like the run's JAX network."""

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from facenet_jax import cli, inference

pytest.importorskip("flatbuffers", reason="the export extra is not installed")
HAS_TF = importlib.util.find_spec("tensorflow") is not None
FORMATS = ["stablehlo"] + [
    fmt
    for fmt, runtime in (("onnx", "onnxruntime"), ("tflite", "ai_edge_litert"))
    if HAS_TF and importlib.util.find_spec(runtime) is not None
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, smoke_config):
    """A run of the smoke config trained for two steps (its eval.json holds a threshold)."""
    from facenet_jax import train

    config = smoke_config.copy_and_resolve_references()
    config.train.num_steps = 2
    wd = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(config, wd)
    return wd


@pytest.fixture(scope="module")
def folder(tmp_path_factory, digits):
    """FOLDER/<digit>/<k>.png: 4 digits x 3 images, 20x20 pixels."""
    images, labels = digits
    root = tmp_path_factory.mktemp("faces")
    for k in range(4):
        (root / f"id{k}").mkdir()
        for n, x in enumerate(images[labels == k][:3]):
            pixels = ((x[:, :, 0] + 1) * 127.5).astype(np.uint8)
            Image.fromarray(pixels).resize((20, 20)).save(root / f"id{k}" / f"{n}.png")
    return root


def run(args, capsys):
    code = cli.main([*args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_then_embed_verify_evaluate(fmt, workdir, folder, capsys, tmp_path):
    model = str(tmp_path / f"model.{fmt}")
    out = run(["export", "--workdir", workdir, "--format", fmt, "--out", model], capsys)
    with open(os.path.join(workdir, "eval.json")) as f:
        evaluation = json.load(f)
    jax_embedder = inference.load_embedder(workdir)
    assert out["fingerprint"] == jax_embedder.fingerprint and out["contract"] == model + ".json"
    assert out["output"]["threshold"] == evaluation["trained"]["threshold"]
    assert out["input"]["shape"] == [None, 16, 16, 1] and out["bytes"] > 0

    # embed: the same files, the exported model vs the run's network.
    e = {}
    for name, source in (("jax", ["--workdir", workdir]), ("exported", ["--model", model])):
        npz = str(tmp_path / f"{name}.npz")
        res = run(["embed", str(folder), *source, "--out", npz, "--no-progress"], capsys)
        assert res["fingerprint"] == jax_embedder.fingerprint
        e[name] = np.load(npz)
    assert list(e["jax"]["paths"]) == list(e["exported"]["paths"])
    np.testing.assert_allclose(e["exported"]["embeddings"], e["jax"]["embeddings"], atol=1e-5)

    # verify with --model alone: the contract's threshold.
    a, b = str(folder / "id0" / "0.png"), str(folder / "id1" / "0.png")
    v = run(["verify", a, b, "--model", model, "--no-progress"], capsys)
    w = run(["verify", a, b, "--workdir", workdir, "--no-progress"], capsys)
    assert v["threshold"] == w["threshold"] and v["distance"] == pytest.approx(
        w["distance"], abs=1e-5
    )

    # evaluate --split: the run's own test split through the exported model, as eval.json
    # (once: the split's embedding dominates the test's time).
    if fmt != FORMATS[-1]:
        return
    c = evaluation["trained"]
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    m = run(
        [
            "evaluate",
            "--model",
            model,
            "--split",
            "test",
            "--num-pairs",
            str(config["eval"]["num_pairs"]),
        ]
        + ["--seed", str(config["seed"]), "--folds", str(config["eval"]["num_folds"])]
        + ["--output-dir", str(tmp_path / "eval"), "--no-progress"],
        capsys,
    )["verification"]
    assert m["num_pairs"] == c["num_pairs"] == config["eval"]["num_pairs"]
    assert m["auc"] == pytest.approx(c["auc"], abs=1e-3)
    assert m["accuracy"] == pytest.approx(c["accuracy"], abs=0.01)


def test_errors_are_one_line(workdir, capsys, tmp_path):
    assert cli.main(["verify", "a.png", "b.png"]) == 2
    assert "--workdir or --model is required" in capsys.readouterr().err
    missing = str(tmp_path / "none.onnx")
    assert cli.main(["verify", "a.png", "b.png", "--model", missing, "--threshold", "1"]) == 2
    assert "no export contract" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["export", "--workdir", workdir, "--format", "caffe", "--out", missing])


def test_missing_extra_is_named_before_restoring(workdir, capsys, tmp_path, monkeypatch):
    """Without the extra, ``export`` stops with one line naming it (the run is not restored)."""
    import importlib as il

    real = il.import_module

    def no_tensorflow(name, *args):
        if name.split(".")[0] == "tensorflow":
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(il, "import_module", no_tensorflow)
    monkeypatch.setattr(inference, "load_embedder", lambda *a: pytest.fail("restored the run"))
    out = str(tmp_path / "m.onnx")
    assert cli.main(["export", "--workdir", workdir, "--format", "onnx", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "--format=onnx needs" in err and 'pip install -e ".[export]"' in err
    assert len(err.strip().splitlines()) == 1
