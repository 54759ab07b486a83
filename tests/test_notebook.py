"""experiments/colab_tpu.ipynb runs end to end, headless on CPU, with the smoke config.

The notebook's parameters cell (tag ``parameters``) is followed by an injected cell that swaps the
TPU config for configs/smoke.py and the workdir for a temporary one, then nbclient executes every
cell in a fresh ipykernel. Skipped only when nbclient, nbformat or ipykernel is not installed
(they are in the ``test`` extras of setup.cfg).
"""

from __future__ import annotations

import ast
import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from facenet_jax import models, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "experiments", "colab_tpu.ipynb")
KERNEL_NAME = "facenet-jax-test"
CELL_TIMEOUT_S = 400  # Generous for 2 busy cores; the whole notebook takes ~20-60 s.


def _read_notebook():
    nbformat = pytest.importorskip("nbformat", reason="nbformat is needed to run the notebook")
    return nbformat, nbformat.read(NOTEBOOK, as_version=4)


def _parameters(nb) -> tuple[int, dict]:
    """Index and values (literals only) of the cell tagged ``parameters``."""
    index = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(index) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    values = {}
    for node in ast.parse(nb.cells[index[0]].source).body:
        assert isinstance(node, ast.Assign), "the parameters cell holds plain assignments only"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return index[0], values


def _kernel_dir(tmp_path) -> str:
    """A kernelspec for this interpreter, so no user-level 'python3' kernel can shadow it."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    env = {
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
        # Same compile settings as this test session (conftest.py): the run is compile-bound.
        "JAX_DISABLE_MOST_OPTIMIZATIONS": str(jax.config.read("jax_disable_most_optimizations")),
    }
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "facenet_jax test kernel",
        "language": "python",
        "env": env,
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return str(tmp_path / "jupyter")


def test_notebook_runs_headless_with_the_smoke_config(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="nbclient is needed to run the notebook")
    pytest.importorskip("ipykernel", reason="ipykernel is needed to run the notebook")
    nbformat, nb = _read_notebook()
    index, _ = _parameters(nb)
    workdir = str(tmp_path / "run")
    injected = {
        "CONFIG": "configs/smoke.py",
        "OVERRIDES": {},
        "WORKDIR": workdir,
        "MOUNT_DRIVE": False,
        "REPO_URL": "",  # Never clone: the package must already be importable.
        "REQUIRE_ACCELERATOR": False,
    }
    source = "\n".join(f"{k} = {v!r}" for k, v in injected.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source))

    monkeypatch.setenv("JUPYTER_PATH", _kernel_dir(tmp_path))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))  # Connection files.
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},  # Not the repo: the notebook must cd.
    )
    client.execute()

    def text(cell) -> str:
        return "".join(o.get("text", "") for o in cell.get("outputs", []))

    def images(cell) -> int:
        return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert "already importable" in text(code_cells[2])
    assert "ROC AUC" in text(code_cells[-3])  # train_and_evaluate's summary.
    assert images(code_cells[-2]) == 1  # Training curves.
    assert "trained" in text(code_cells[-1]) and images(code_cells[-1]) == 2  # ROC, distances.
    for name in ("eval.json", "metrics.jsonl", "roc.png", "distances.png"):
        assert os.path.exists(os.path.join(workdir, name)), name


@pytest.mark.parametrize("choice", ["notebook default", "configs/tpu.py", "configs/gpu.py"])
def test_the_accelerator_configs_are_valid(choice):
    """The notebook's own CONFIG + OVERRIDES and both accelerator configs, without data: each
    validates, splits over 8 devices, and its model builds at its image size (shapes only)."""
    _, nb = _read_notebook()
    _, params = _parameters(nb)
    path, overrides = (params["CONFIG"], params["OVERRIDES"]) if choice[0] == "n" else (choice, {})
    assert os.path.exists(os.path.join(REPO, path)), path
    config = __import__(path[:-3].replace("/", "."), fromlist=["get_config"]).get_config()
    for dotted, value in overrides.items():
        section, name = dotted.split(".")
        assert name in config[section], f"OVERRIDES names a missing field {dotted!r}"
        config[section][name] = value
    train.validate_config(config)
    d = config.data
    assert (d.identities_per_batch * d.images_per_identity) % 8 == 0, "must split over 8 devices"
    model = models.create_model(config.model)
    shape = (1, d.image_size, d.image_size, d.channels)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    dtypes = {x.dtype for x in jax.tree.leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}, "params and statistics stay float32"
