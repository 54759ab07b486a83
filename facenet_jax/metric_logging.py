"""Metric sinks: ``WORKDIR/metrics.jsonl`` (one JSON object per log step) and TensorBoard events.

Only JAX process 0 writes; other processes get a writer that drops everything.

A resumed run restarts at its restored step s, so records past s were written by a run that died
before saving them, and the resumed run writes those steps again. ``resume_step=s`` keeps each step
once: metrics.jsonl is rewritten without the records past s, and TensorBoard is told to purge its
events from step s + 1 on (``SummaryWriter(purge_step=...)``, a SessionLog.START event).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
from absl import logging

FILENAME = "metrics.jsonl"


class MetricWriter:
    """Appends ``{"step": s, **scalars}`` lines to metrics.jsonl and, if tensorboardX is
    installed, scalar summaries to ``WORKDIR/tensorboard``."""

    def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int | None = None):
        self.workdir = workdir
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._file = None
        self._records: list[dict[str, Any]] = []
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, FILENAME)
        purge_step = None
        if resume_step is not None:
            self._records = _truncate(path, resume_step)
            if self._records or os.path.isdir(os.path.join(workdir, "tensorboard")):
                purge_step = resume_step + 1
        elif os.path.exists(path):
            self._records = read_metrics(workdir)
        self._file = open(path, "a")  # noqa: SIM115
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step)
        except ImportError:  # TensorBoard events are optional.
            logging.info("tensorboardX not installed: writing metrics.jsonl only")

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _to_json(v) for k, v in scalars.items()}
        record = {"step": int(step), **clean}
        self._records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float | int) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def has(self, step: int, prefix: str = "") -> bool:
        """Whether a record at ``step`` holds a key starting with ``prefix`` (process 0 knows;
        other processes answer False and write nothing anyway)."""
        return any(
            r["step"] == step and any(k.startswith(prefix) for k in r if k != "step")
            for r in self._records
        )

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _truncate(path: str, resume_step: int) -> list[dict[str, Any]]:
    """Rewrites ``path`` (atomically) without the records past ``resume_step``; returns the rest."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept, dropped = [], 0
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # A line cut short by a crash mid-write.
            dropped += 1
            continue
        if record.get("step", 0) <= resume_step:
            kept.append(record)
        else:
            dropped += 1
    if dropped:
        logging.warning(
            "%s: dropping %d records past the restored step %d (they are logged again)",
            path,
            dropped,
            resume_step,
        )
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, path)
    return kept


def _to_json(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    if isinstance(v, int | bool):
        return v
    return f if math.isfinite(f) else str(f)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (for notebooks and tests)."""
    with open(os.path.join(workdir, FILENAME)) as f:
        return [json.loads(line) for line in f if line.strip()]
