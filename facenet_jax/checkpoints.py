"""Checkpoints with orbax: save every N steps and at the end, resume from the latest step.

``WORKDIR/checkpoints/<step>/`` holds the train state (step, params, batch_stats, opt_state);
``WORKDIR/config.json`` holds the run's config, written once, used to refuse a resume with an
incompatible config and to rebuild the model for inference.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

# Config fields that change the shapes or meaning of the saved state: resuming across a change of
# any of them is refused. Others (steps, logging, evaluation) may change between restarts.
STATE_DEFINING_FIELDS = (
    "model.name",
    "model.width",
    "model.embedding_dim",
    "model.pooling",
    "data.channels",
    "data.image_size",
    "train.optimizer",
)


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a checkpoint from a config that cannot be resumed with this one."""


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def config_path(workdir: str) -> str:
    return os.path.join(workdir, "config.json")


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with."""
    path = config_path(workdir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a facenet_jax run directory")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes config.json atomically (temp file + rename); process 0 only."""
    if jax.process_index() != 0:
        return
    path = config_path(workdir)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json(indent=2, sort_keys=True))
    os.replace(tmp, path)


def check_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises IncompatibleCheckpointError if workdir was trained with a different state layout."""
    if not os.path.exists(config_path(workdir)):
        return
    saved = load_config(workdir)
    diffs = []
    for field in STATE_DEFINING_FIELDS:
        try:
            old = _get(saved, field)
        except (KeyError, AttributeError):
            continue
        new = _get(config, field)
        if old != new:
            diffs.append(f"config.{field}: checkpoint has {old!r}, this run has {new!r}")
    if diffs:
        raise IncompatibleCheckpointError(
            f"workdir {workdir!r} holds a checkpoint from an incompatible config:\n  "
            + "\n  ".join(diffs)
            + "\nUse a new --workdir, or the same values to resume."
        )


def create_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """An orbax CheckpointManager keeping ``config.train.keep_checkpoints`` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.train.keep_checkpoints,
        create=True,
        enable_async_checkpointing=False,
    )
    directory = epath.Path(os.path.abspath(workdir)) / "checkpoints"
    return ocp.CheckpointManager(directory, options=options)


def state_to_dict(state: Any) -> dict[str, Any]:
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }


def save(manager: ocp.CheckpointManager, state: Any) -> None:
    step = int(jax.device_get(state.step))
    if step in manager.all_steps():
        return
    manager.save(step, args=ocp.args.StandardSave(state_to_dict(state)))
    manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, state: Any, workdir: str) -> Any:
    """Restores the latest checkpoint into ``state``'s structure and shardings, if there is one."""
    step = manager.latest_step()
    if step is None:
        return state
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_to_dict(state))
    try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    except (ValueError, KeyError, TypeError) as e:
        raise IncompatibleCheckpointError(
            f"checkpoint step {step} in {workdir!r} does not match this config's train state: {e}"
        ) from e
    return state.replace(**restored)
