"""The contract beside each artefact: what it states, where it lies, and errors on bad ones."""

import json

import pytest

from facenet_jax import export
from facenet_jax.export import contract, deps

pytest.importorskip("flatbuffers", reason="the export extra is not installed")


@pytest.fixture(scope="module")
def exported(embedder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "model.stablehlo")
    return out, export.export_embedder(embedder, "stablehlo", out, threshold=0.75)


def test_states_the_preprocessing(embedder, exported):
    out, c = exported
    assert contract.contract_path(out) == out + ".json"
    assert contract.read(out) == c == contract.read(out + ".json")
    assert c["fingerprint"] == embedder.fingerprint and c["step"] == 0
    inp, outp = c["input"], c["output"]
    assert inp["layout"] == "NHWC" and inp["shape"] == [None, 16, 16, 1]
    assert inp["value_range"] == [-1.0, 1.0] and inp["dtype"] == "float32"
    assert inp["crop"] == embedder.spec.crop and inp["channels"] == 1
    assert outp["shape"] == [None, 16] and outp["l2_normalised"] and outp["threshold"] == 0.75
    assert c["config"]["data"] == json.loads(embedder.config.data.to_json())
    size, sha = contract.artefact_digest(out)
    assert (c["artefact_bytes"], c["artefact_sha256"]) == (size, sha)
    text = contract.describe(c, out)
    assert embedder.fingerprint in text and "[Nx16x16x1]" in text and "0.75" in text
    assert outp["test_time_flip"] is False and "flip:" not in text  # config.eval.flip's default.
    flipping = c | {"output": outp | {"test_time_flip": True}}
    assert "flip:   embedding = l2_normalize(f(x) + f(x[:, :, ::-1]))" in contract.describe(
        flipping, out
    )


def test_bad_contracts_are_named(exported, tmp_path):
    out, c = exported
    with pytest.raises(FileNotFoundError, match="no export contract .*nothing.onnx.json"):
        contract.read(str(tmp_path / "nothing.onnx"))
    bad = tmp_path / "m.onnx.json"
    bad.write_text(json.dumps({k: v for k, v in c.items() if k != "input"}))
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['input'\]"):
        contract.read(str(tmp_path / "m.onnx"))
    bad.write_text(json.dumps(c | {"version": 99}))
    with pytest.raises(ValueError, match="contract version 99"):
        contract.read(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        contract.read(str(bad))


def test_unknown_format_and_options(embedder, tmp_path):
    with pytest.raises(ValueError, match=r"unknown export format 'caffe'; allowed: \['stablehlo'"):
        export.export_embedder(embedder, "caffe", str(tmp_path / "m"))
    with pytest.raises(ValueError, match="--quantize=float16 applies to --format=tflite only"):
        export.export_embedder(embedder, "onnx", str(tmp_path / "m"), quantize="float16")


def test_missing_extra_names_it():
    with pytest.raises(deps.MissingExtraError, match=r"--format=x needs .*\.\[export\]"):
        deps.require("facenet_jax_no_such_module", "--format=x")
