"""Metric sinks: ``WORKDIR/metrics.jsonl`` (one JSON object per log step) and TensorBoard events.

Only JAX process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
from absl import logging


class MetricWriter:
    """Appends ``{"step": s, **scalars}`` lines to metrics.jsonl and, if tensorboardX is
    installed, scalar summaries to ``WORKDIR/tensorboard``."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._file = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard events are optional.
            logging.info("tensorboardX not installed: writing metrics.jsonl only")

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _to_json(v) for k, v in scalars.items()}
        self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float | int) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


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
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
