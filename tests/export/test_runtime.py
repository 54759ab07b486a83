"""ExportedEmbedder: image files reach the exported model through the run's own preprocessing
(the same ``embed_files`` as the JAX Embedder), so the parity holds end to end."""

import numpy as np
import pytest
from PIL import Image

from facenet_jax import export, inference
from facenet_jax.export import runtime

pytest.importorskip("flatbuffers", reason="the export extra is not installed")


@pytest.fixture(scope="module")
def files(digits, tmp_path_factory):
    """Nine PNG files of digits, 24x20 pixels (so the crop and the resize both act)."""
    images, _ = digits
    root = tmp_path_factory.mktemp("files")
    paths = []
    for k in range(9):
        pixels = ((images[k * 20, :, :, 0] + 1) * 127.5).astype(np.uint8)
        path = str(root / f"digit_{k}.png")
        Image.fromarray(pixels).resize((20, 24), Image.BILINEAR).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def exported(embedder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "model.stablehlo")
    export.export_embedder(embedder, "stablehlo", out)
    return export.load(out)


def test_is_an_embedder(exported, embedder):
    assert isinstance(exported, inference.Embedder) and isinstance(
        exported, runtime.ExportedEmbedder
    )
    assert exported.fingerprint == embedder.fingerprint
    assert exported.image_shape == embedder.image_shape and exported.spec == embedder.spec
    assert exported.format == "stablehlo" and exported.threshold is None


@pytest.mark.parametrize("flip", [False, True])
def test_files_match_jax(exported, embedder, files, flip):
    want, ok = embedder.embed_files(None, files, flip=flip, batch_size=4)
    got, ok2 = exported.embed_files(None, files, flip=flip, batch_size=4)
    assert ok.all() and ok2.all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_missing_artefact_is_named(exported, tmp_path):
    import shutil

    shutil.copy(exported.path + ".json", tmp_path / "model.stablehlo.json")
    with pytest.raises(FileNotFoundError, match="model.stablehlo' .*missing"):
        export.load(str(tmp_path / "model.stablehlo"))
