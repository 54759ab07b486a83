"""Ablation sweeps: the main job over a grid of config overrides and seeds, summarised as a table.

Every cell of the grid is one ``python -m facenet_jax.main`` run in its own workdir under
``--root`` (outside the repository); a cell whose ``eval.json`` exists is not run again, so an
interrupted sweep resumes where it stopped, and a failed run is reported, not fatal. The table
gives, per grid point, the mean and standard deviation over seeds of the verification metrics of
the trained network (``eval.json``), the untrained baseline and the last logged training
diagnostics (fraction of active triplets, mean d(a,p) and d(a,n) of the mined triplets).

  python experiments/sweep.py --config=configs/default.py \\
      --grid train.mining=semi_hard,batch_hard,batch_all,hardest,random --seeds 0 1 2 \\
      --root /tmp/sweeps/mining --markdown /tmp/sweeps/mining.md

``--grid`` may be repeated (the product of the axes is swept); ``--set FIELD=VALUE`` fixes a field
for every run. Values are passed to ``--config.FIELD=VALUE`` verbatim.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np

_METRICS = (
    ("accuracy", "accuracy"),
    ("auc", "AUC"),
    ("eer", "EER"),
    ("tar_at_far_1e-2", "TAR@FAR=1e-2"),
)
_TRAIN = (("fraction_active", "active"), ("mean_pos_dist", "d(a,p)"), ("mean_neg_dist", "d(a,n)"))


def parse_axis(text: str) -> tuple[str, list[str]]:
    """``"train.margin=0.1,0.2"`` -> ``("train.margin", ["0.1", "0.2"])``."""
    field, sep, values = text.partition("=")
    items = [v for v in values.split(",") if v]
    if not sep or not field or not items:
        raise ValueError(f"--grid {text!r}: expected FIELD=VALUE[,VALUE...]")
    return field, items


def expand_grid(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """The product of the axes as override dicts, first axis slowest; ``[{}]`` without axes."""
    fields = [f for f, _ in axes]
    if len(set(fields)) != len(fields):
        raise ValueError(f"--grid: a field is given twice: {fields}")
    return [
        dict(zip(fields, combo, strict=True)) for combo in itertools.product(*(v for _, v in axes))
    ]


def run_name(point: dict[str, str], seed: int) -> str:
    parts = [f"{k.split('.')[-1]}={v}" for k, v in point.items()]
    return "_".join(parts + [f"seed={seed}"]).replace("/", "-")


def last_train_metrics(metrics_path: str) -> dict[str, float]:
    """The last logged training record of ``metrics.jsonl`` (without the ``eval/`` entries)."""
    last: dict[str, float] = {}
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if any(not k.startswith("eval/") and k != "step" for k in record):
                last = record
    return last


def run_one(args, point: dict[str, str], seed: int) -> dict:
    """Runs (or reuses) one cell; returns its eval and training summary, or an error."""
    workdir = os.path.join(args.root, run_name(point, seed))
    eval_path = os.path.join(workdir, "eval.json")
    row: dict = {"point": point, "seed": seed, "workdir": workdir}
    if not os.path.exists(eval_path):
        os.makedirs(workdir, exist_ok=True)
        cmd = [sys.executable, "-m", "facenet_jax.main", f"--config={args.config}"]
        cmd += [f"--workdir={workdir}", f"--config.seed={seed}"]
        cmd += ["--config.train.progress_bar=False"]
        cmd += [f"--config.{k}={v}" for k, v in {**dict(args.set), **point}.items()]
        start = time.perf_counter()
        with open(os.path.join(workdir, "sweep.log"), "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        row["seconds"] = round(time.perf_counter() - start, 1)
        if rc != 0 or not os.path.exists(eval_path):
            row["error"] = f"exit {rc}, see {workdir}/sweep.log"
            return row
    with open(eval_path) as f:
        result = json.load(f)
    row["trained"], row["untrained"] = result["trained"], result.get("untrained", {})
    row["train"] = last_train_metrics(os.path.join(workdir, "metrics.jsonl"))
    return row


def _mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} +- {np.std(values, ddof=1):.3f}"


def summarise(rows: list[dict]) -> list[dict[str, str]]:
    """One table row per grid point: mean +- sample std over its successful seeds."""
    table, points = [], []
    for row in rows:
        if row["point"] not in points:
            points.append(row["point"])
    for point in points:
        ok = [r for r in rows if r["point"] == point and "error" not in r]
        line = {k: v for k, v in point.items()}
        line["seeds"] = f"{len(ok)}/{sum(r['point'] == point for r in rows)}"
        line["untrained accuracy"] = _mean_std([r["untrained"]["accuracy"] for r in ok])
        for key, name in _METRICS:
            line[name] = _mean_std([r["trained"][key] for r in ok])
        for key, name in _TRAIN:
            line[name] = _mean_std([r["train"][key] for r in ok if key in r["train"]])
        table.append(line)
    return table


def markdown(table: list[dict[str, str]]) -> str:
    if not table:
        return ""
    header = list(table[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in table]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.py")
    p.add_argument("--grid", action="append", default=[], help="FIELD=V1,V2,... (repeatable)")
    p.add_argument("--set", action="append", default=[], help="FIELD=VALUE for every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--root", required=True, help="workdirs go here (outside the repository)")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    fixed = []
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep or not field:
            p.error(f"--set {item!r}: expected FIELD=VALUE")
        fixed.append((field, value))
    args.set = fixed
    try:
        points = expand_grid([parse_axis(a) for a in args.grid])
    except ValueError as err:
        p.error(str(err))
    rows = []
    for point, seed in itertools.product(points, args.seeds):
        row = run_one(args, point, seed)
        status = row.get("error") or (
            f"accuracy {row['untrained']['accuracy']:.3f} -> {row['trained']['accuracy']:.3f}"
        )
        print(f"{run_name(point, seed)}: {status}", flush=True)
        rows.append(row)
    table = markdown(summarise(rows))
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
