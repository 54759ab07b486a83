"""Each plot writes a valid, non-trivial PNG."""

import numpy as np
from PIL import Image

from facenet_jax.evaluate import plots, verification


def _check_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        arr = np.asarray(im.convert("L"))
    assert arr.shape[0] > 100 and arr.shape[1] > 100
    assert arr.std() > 0  # something was drawn


def test_all_plots(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.5
    d = np.where(y, rng.normal(0.7, 0.2, 300), rng.normal(1.4, 0.3, 300))
    far, tar, _ = verification.roc_curve(d, y)
    far0, tar0, _ = verification.roc_curve(rng.random(300), y)
    paths = [
        plots.plot_roc({"untrained": (far0, tar0), "trained": (far, tar)}, str(tmp_path / "r.png")),
        plots.plot_distance_histograms(d, y, 1.0, str(tmp_path / "sub" / "h.png")),
        plots.plot_embeddings_2d(
            rng.normal(size=(60, 8)), np.repeat(np.arange(12), 5), str(tmp_path / "e.png"), 4
        ),
        plots.plot_group_bars({"a": 0.9, "b": 0.8, "c": None}, str(tmp_path / "g.png"), "acc"),
    ]
    for p in paths:
        _check_png(p)
