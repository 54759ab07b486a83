"""experiments/sweep.py: grid expansion, resumable cells and the summary table."""

import json
import types

import numpy as np
import pytest

from experiments import sweep


def test_grid_is_the_product_of_the_axes_first_axis_slowest():
    axes = [sweep.parse_axis("train.mining=semi_hard,batch_hard"), sweep.parse_axis("seed=0,1")]
    assert sweep.expand_grid(axes) == [
        {"train.mining": "semi_hard", "seed": "0"},
        {"train.mining": "semi_hard", "seed": "1"},
        {"train.mining": "batch_hard", "seed": "0"},
        {"train.mining": "batch_hard", "seed": "1"},
    ]
    assert sweep.expand_grid([]) == [{}]


@pytest.mark.parametrize("bad", ["train.margin", "=0.1", "train.margin="])
def test_bad_axis_names_the_expected_form(bad):
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        sweep.parse_axis(bad)


def test_repeated_field_is_refused():
    with pytest.raises(ValueError, match="twice"):
        sweep.expand_grid([("a.b", ["1"]), ("a.b", ["2"])])


def _fake_run(root, point, seed, accuracy, untrained, active):
    workdir = root / sweep.run_name(point, seed)
    workdir.mkdir(parents=True)
    trained = {"accuracy": accuracy, "auc": accuracy, "eer": 1 - accuracy, "tar_at_far_1e-2": 0.5}
    (workdir / "eval.json").write_text(
        json.dumps({"trained": trained, "untrained": {"accuracy": untrained}})
    )
    records = [
        {"step": 50, "loss": 1.0, "fraction_active": 0.9, "mean_pos_dist": 1, "mean_neg_dist": 2},
        {
            "step": 100,
            "loss": 0.5,
            "fraction_active": active,
            "mean_pos_dist": 1,
            "mean_neg_dist": 2,
        },
        {"step": 100, "eval/accuracy": accuracy},
    ]
    (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_finished_cells_are_reused_and_summarised_over_seeds(tmp_path):
    point = {"train.mining": "semi_hard"}
    for seed, acc, active in [(0, 0.9, 0.2), (1, 0.8, 0.4)]:
        _fake_run(tmp_path, point, seed, acc, 0.6, active)
    args = types.SimpleNamespace(root=str(tmp_path), config="unused.py", set=[])
    # eval.json exists, so no subprocess is started (config "unused.py" does not exist).
    rows = [sweep.run_one(args, point, seed) for seed in (0, 1)]
    assert [r["train"]["fraction_active"] for r in rows] == [0.2, 0.4]  # last training record
    (line,) = sweep.summarise(rows)
    assert line["train.mining"] == "semi_hard" and line["seeds"] == "2/2"
    assert line["accuracy"] == f"0.850 +- {np.std([0.9, 0.8], ddof=1):.3f}"
    assert line["untrained accuracy"] == "0.600 +- 0.000"
    assert line["active"] == f"0.300 +- {np.std([0.2, 0.4], ddof=1):.3f}"
    table = sweep.markdown([line])
    assert table.splitlines()[0].startswith("| train.mining | seeds | untrained accuracy |")
    assert len(table.splitlines()) == 3


def test_failed_cells_are_counted_not_averaged(tmp_path):
    point = {"train.margin": "0.2"}
    _fake_run(tmp_path, point, 0, 0.9, 0.6, 0.1)
    ok = sweep.run_one(
        types.SimpleNamespace(root=str(tmp_path), config="unused.py", set=[]), point, 0
    )
    failed = {"point": point, "seed": 1, "error": "exit 1"}
    (line,) = sweep.summarise([ok, failed])
    assert line["seeds"] == "1/2" and line["accuracy"] == "0.900"
