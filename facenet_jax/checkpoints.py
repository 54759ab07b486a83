"""Checkpoints with orbax: save every N steps and at the end, resume from the newest intact step.

``WORKDIR/checkpoints/<step>/`` holds the train state (step, params, batch_stats, opt_state);
``WORKDIR/config.json`` holds the run's config, written once, used to refuse a resume with an
incompatible config and to rebuild the model for inference.

Integrity rules:
  * a state with a non-finite value (NaN, +-inf) is never saved (``NonFiniteStateError``);
  * restoring tries the newest step first; a step that cannot be read (truncated or deleted files)
    or holds non-finite values is skipped with a warning naming it, and the next older one is
    used. Training moves the skipped step to ``WORKDIR/checkpoints.unusable/`` (never deleted),
    so the step can be written again;
  * a checkpoint whose arrays do not match the train state this config builds is refused in one
    line naming the differing config fields (``IncompatibleCheckpointError``);
  * an explicitly requested step that does not exist lists the steps that do;
  * temporary directories left by an interrupted save are removed when training starts.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

# Config fields that change the shapes or meaning of the saved state: resuming across a change of
# any of them is refused before anything is compiled. Each maps to the function of the value that
# matters (grad_clip_norm only matters as on/off: clipping adds a state to the optimiser chain).
STATE_DEFINING_FIELDS: dict[str, Callable[[Any], Any]] = {
    "model.name": lambda v: v,
    "model.width": lambda v: v,
    "model.embedding_dim": lambda v: v,
    "model.pooling": lambda v: v,
    "data.channels": lambda v: v,
    "data.image_size": lambda v: v,
    "train.optimizer": lambda v: v,
    "train.grad_clip_norm": lambda v: "clipping" if v > 0 else "no clipping",
}
UNUSABLE_DIR = "checkpoints.unusable"
_TMP_MARKER = ".orbax-checkpoint-tmp"


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a checkpoint from a config that cannot be resumed with this one."""


class CheckpointNotFoundError(FileNotFoundError):
    """A requested step, or any usable step, is missing from the workdir."""


class NonFiniteStateError(FloatingPointError):
    """A state with NaN or infinite values was about to be saved."""


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def config_path(workdir: str) -> str:
    return os.path.join(workdir, "config.json")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def load_config(workdir: str, fill_missing: bool = True) -> ml_collections.ConfigDict:
    """The config a workdir was trained with.

    A run trained before a config field existed has a config.json without it: with
    ``fill_missing`` such fields take configs/default.py's values, named in one logged line.
    """
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir {workdir}: no such directory")
    path = config_path(workdir)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--workdir {workdir}: no config.json, not a facenet_jax run directory (train one "
            "with python -m facenet_jax.main --workdir=...)"
        )
    try:
        with open(path) as f:
            config = ml_collections.ConfigDict(json.load(f))
    except ValueError as e:
        raise ValueError(f"{path}: not a readable config ({e})") from e
    if fill_missing:
        added = fill_missing_fields(config, default_config())
        if added:
            logging.warning(
                "%s predates config field(s) %s: using configs/default.py's values %s",
                path,
                ", ".join(added),
                ", ".join(f"{k}={_get(config, k)!r}" for k in added),
            )
    return config


def default_config() -> ml_collections.ConfigDict | None:
    """configs/default.py's ``get_config()`` (None when the repository's configs/ is absent)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    path = os.path.join(path, "default.py")
    if not os.path.exists(path):
        return None
    import importlib.util  # noqa: PLC0415 -- only when a config is loaded.

    spec = importlib.util.spec_from_file_location("_facenet_default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def fill_missing_fields(
    config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict | None
) -> list[str]:
    """Adds to ``config`` (in place) every leaf field of ``defaults`` it lacks; returns their
    dotted names (sorted). Fields ``config`` has are kept, even where ``defaults`` lacks them."""
    if defaults is None:
        return []
    have = _flatten(_as_dict(config))
    added = []
    for name, value in sorted(_flatten(_as_dict(defaults)).items()):
        if name in have:
            continue
        *sections, leaf = name.split(".")
        node = config
        for part in sections:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                if part in node:  # A leaf where the default has a section: leave it.
                    node = None
                    break
                node[part] = ml_collections.ConfigDict()
            node = node[part]
        if node is not None:
            node[leaf] = value
            added.append(name)
    return added


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
    """Raises IncompatibleCheckpointError (one line) if workdir holds another state layout."""
    if not os.path.exists(config_path(workdir)):
        return
    saved = load_config(workdir, fill_missing=False)
    diffs = []
    for field, meaning in STATE_DEFINING_FIELDS.items():
        try:
            old = _get(saved, field)
        except (KeyError, AttributeError):
            continue
        new = _get(config, field)
        if meaning(old) != meaning(new):
            diffs.append(f"config.{field} (checkpoint {old!r}, this run {new!r})")
    if diffs:
        raise IncompatibleCheckpointError(
            f"workdir {workdir!r} holds a checkpoint of an incompatible config: "
            + ", ".join(diffs)
            + "; use a new --workdir, or the checkpoint's values to resume"
        )


def config_differences(
    old: ml_collections.ConfigDict | dict, new: ml_collections.ConfigDict | dict
) -> list[str]:
    """``["train.grad_clip_norm 0.0 -> 1.0", ...]``: every leaf field whose value differs."""
    a, b = _flatten(_as_dict(old)), _flatten(_as_dict(new))
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "(absent)"), b.get(key, "(absent)")
        if _normalise(va) != _normalise(vb):
            out.append(f"{key} {va!r} -> {vb!r}")
    return out


def _as_dict(config: Any) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _normalise(v: Any) -> Any:
    return tuple(v) if isinstance(v, list | tuple) else v  # JSON turns tuples into lists.


# ----------------------------------------------------------------------------- manager


def create_manager(
    workdir: str, config: ml_collections.ConfigDict, *, for_training: bool = False
) -> ocp.CheckpointManager:
    """An orbax CheckpointManager keeping ``config.train.keep_checkpoints`` steps.

    ``for_training`` (the process holding the workdir lock) also removes temporary directories an
    interrupted save left behind; readers (inference, the CLI) never touch the directory.
    """
    directory = checkpoint_dir(workdir)
    if for_training and jax.process_index() == 0:
        _remove_temporary_dirs(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.train.keep_checkpoints,
        create=for_training,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(
        epath.Path(directory), item_handlers=ocp.StandardCheckpointHandler(), options=options
    )


def _remove_temporary_dirs(directory: str) -> None:
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        if _TMP_MARKER in name:
            logging.warning(
                "removing %s, left by an interrupted checkpoint save", os.path.join(directory, name)
            )
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def all_finite(tree: Any) -> jax.Array:
    """True iff every floating-point leaf of ``tree`` is finite: a scalar bool, traceable.

    The one predicate behind the train step's non-finite guard and the checkpoint writer.
    """
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


_all_finite_jit = jax.jit(all_finite)


def state_to_dict(state: Any) -> dict[str, Any]:
    tree = {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }
    # Margin-softmax runs only: triplet-only checkpoints keep the layout they always had.
    if getattr(state, "class_weights", None) is not None:
        tree["class_weights"] = state.class_weights
    return tree


def save(manager: ocp.CheckpointManager, state: Any) -> None:
    """Saves ``state`` at its step (all processes call it); refuses non-finite values."""
    step = int(jax.device_get(state.step))
    if step in manager.all_steps():
        return
    tree = state_to_dict(state)
    if not bool(_all_finite_jit(tree)):
        raise NonFiniteStateError(
            f"refusing to save checkpoint step {step}: the train state holds NaN or inf values"
        )
    manager.save(step, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()


# ----------------------------------------------------------------------------- restore


def restore_latest(
    manager: ocp.CheckpointManager,
    state: Any,
    workdir: str,
    *,
    config: ml_collections.ConfigDict | None = None,
    set_aside: bool = False,
) -> Any:
    """Restores the newest intact checkpoint into ``state``'s structure and shardings.

    Returns ``state`` unchanged when there is no checkpoint. ``set_aside`` (training only) moves
    unusable newer steps to ``WORKDIR/checkpoints.unusable/`` so they can be written again;
    ``config`` (this run's) lets an incompatibility name the config fields that differ.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_to_dict(state))
    restored, _ = restore(manager, target, workdir, config=config, set_aside=set_aside)
    return state if restored is None else state.replace(**restored)


def restore(
    manager: ocp.CheckpointManager,
    target: Any,
    workdir: str,
    step: int | None = None,
    *,
    config: ml_collections.ConfigDict | None = None,
    set_aside: bool = False,
) -> tuple[dict[str, Any] | None, int | None]:
    """Restores ``step`` (default: the newest intact step) into ``target``'s structure.

    Args:
      target: ``state_to_dict`` of a train state, or of its ``jax.ShapeDtypeStruct`` shapes.

    Returns:
      (restored dict, its step), or (None, None) when the workdir holds no checkpoint.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    where = checkpoint_dir(workdir)
    if step is not None and step not in steps:
        raise CheckpointNotFoundError(
            f"no checkpoint at step {step} in {where}; steps there: "
            + (", ".join(map(str, sorted(steps))) or "none")
        )
    if not steps:
        return None, None
    candidates = [step] if step is not None else steps
    problems = []
    for candidate in candidates:
        problem = _structure_problem(manager, candidate, target)
        if problem is not None and problem[0] == "incompatible":
            raise IncompatibleCheckpointError(
                _incompatible_message(workdir, candidate, problem[1], config)
            )
        restored = None
        if problem is None:
            try:
                restored = manager.restore(candidate, args=ocp.args.StandardRestore(target))
            except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise bare Exception.
                problem = ("unreadable", _first_line(e))
        if problem is None and not bool(_all_finite_jit(restored)):
            problem = ("non-finite", "holds NaN or inf values")
        if not _on_every_process(problem is None):
            problem = problem or ("unreadable", "unreadable on another process")
        if problem is None:
            if problems:
                logging.warning("resuming from checkpoint step %d in %s", candidate, where)
            return restored, candidate
        problems.append((candidate, problem[1]))
        fallback = [s for s in candidates if s < candidate]
        logging.warning(
            "checkpoint step %d in %s is unusable (%s)%s; the checkpoint is left on disk",
            candidate,
            where,
            problem[1],
            f", falling back to step {fallback[0]}" if fallback else "",
        )
        if set_aside:
            _set_aside(manager, workdir, candidate)
    listing = "; ".join(f"step {s}: {why}" for s, why in problems)
    raise CheckpointNotFoundError(
        f"no usable checkpoint in {where} ({listing}); move {where} away to start the run afresh"
        if step is None
        else f"checkpoint step {step} in {where} is unusable: {problems[0][1]}"
    )


def _set_aside(manager: ocp.CheckpointManager, workdir: str, step: int) -> None:
    """Moves an unusable step out of orbax's sight (kept for inspection, never deleted)."""
    if jax.process_index() == 0:
        src = os.path.join(checkpoint_dir(workdir), str(step))
        dst_dir = os.path.join(os.path.abspath(workdir), UNUSABLE_DIR)
        os.makedirs(dst_dir, exist_ok=True)
        dst, n = os.path.join(dst_dir, str(step)), 1
        while os.path.exists(dst):
            dst, n = os.path.join(dst_dir, f"{step}.{n}"), n + 1
        if os.path.exists(src):
            os.rename(src, dst)
            logging.warning("moved unusable checkpoint step %d to %s", step, dst)
    _sync("facenet_jax_set_aside_checkpoint")
    manager.reload()


def _structure_problem(
    manager: ocp.CheckpointManager, step: int, target: Any
) -> tuple[str, str] | None:
    """("incompatible", what differs) | ("unreadable", why) | None, from the saved metadata."""
    try:
        metadata = manager.item_metadata(step)
    except Exception as e:  # noqa: BLE001 -- any failure to read it means the step is damaged.
        return "unreadable", f"metadata: {_first_line(e)}"
    if metadata is None:
        return "unreadable", "no readable metadata"
    have, want = _leaf_specs(metadata), _leaf_specs(target)
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} arrays this run has (e.g. {missing[0]})")
        if extra:
            parts.append(f"has {len(extra)} arrays this run lacks (e.g. {extra[0]})")
        return "incompatible", " and ".join(parts)
    for key in sorted(want):
        if tuple(have[key][0]) != tuple(want[key][0]):
            return "incompatible", f"{key} has shape {have[key][0]}, this run {want[key][0]}"
    return None


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{"opt_state/0/mu/Conv_0/kernel": (shape, dtype)} with container kinds normalised away."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        if shape is None:
            if not isinstance(leaf, int | float | np.number):
                continue
            shape = ()  # A Python scalar (a fresh state's step).
        out["/".join(_key_name(k) for k in path)] = (tuple(shape), getattr(leaf, "dtype", None))
    return out


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _incompatible_message(
    workdir: str, step: int, what: str, config: ml_collections.ConfigDict | None
) -> str:
    fields = ""
    if config is not None and os.path.exists(config_path(workdir)):
        diffs = config_differences(load_config(workdir, fill_missing=False), config)
        if diffs:
            fields = "; config fields that differ from the run's config.json: " + ", ".join(diffs)
    return (
        f"checkpoint step {step} in {checkpoint_dir(workdir)} does not match the train state of "
        f"this config: it {what}{fields}; use a new --workdir, or the run's values to resume"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    if "Unable to retrieve default item" in line:
        line = "its files are missing"
    line = line.split(". See full TensorStore details")[0]
    return (line[:200] + "...") if len(line) > 200 else line


def _on_every_process(flag: bool) -> bool:
    """True iff ``flag`` holds on every process (all take the same branch)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
