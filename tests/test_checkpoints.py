"""Checkpoint integrity: no non-finite saves, fallback past damaged steps, one-line mismatches."""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from facenet_jax import checkpoints, train


@pytest.fixture(scope="module")
def config():
    return smoke.get_config()


@pytest.fixture(scope="module")
def fresh_state(config):
    return train.create_train_state(config, jax.random.key(0), (16, 16, 1))


def _state_at(state, step):
    """``state`` at ``step`` with parameters that tell the steps apart."""
    params = jax.tree.map(lambda p: p + step, state.params)
    return state.replace(step=jnp.asarray(step, jnp.int32), params=params)


def _save_steps(workdir, config, state, steps=(3, 6)):
    manager = checkpoints.create_manager(workdir, config, for_training=True)
    for step in steps:
        checkpoints.save(manager, _state_at(state, step))
    manager.close()
    checkpoints.write_config(config, workdir)


def _restore(workdir, config, state, **kwargs):
    manager = checkpoints.create_manager(workdir, config)
    try:
        return checkpoints.restore_latest(manager, state, workdir, config=config, **kwargs)
    finally:
        manager.close()


def _damage(workdir, step):
    """Truncates every array data file of a step (a disk that filled up, a copy cut short)."""
    root = os.path.join(workdir, "checkpoints", str(step))
    damaged = 0
    for folder, _, files in os.walk(root):
        if os.path.basename(folder) == "d":
            for name in files:
                with open(os.path.join(folder, name), "r+b") as f:
                    f.truncate(10)
                damaged += 1
    assert damaged, "no array data files found to damage"


def _assert_params_of_step(state, fresh_state, step):
    pairs = zip(jax.tree.leaves(state.params), jax.tree.leaves(fresh_state.params), strict=True)
    for got, init in pairs:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(init) + step)


def test_save_refuses_non_finite_state(tmp_path, config, fresh_state):
    workdir = str(tmp_path / "run")
    manager = checkpoints.create_manager(workdir, config, for_training=True)
    bad = _state_at(fresh_state, 3)
    bad = bad.replace(params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), bad.params))
    with pytest.raises(checkpoints.NonFiniteStateError, match="step 3"):
        checkpoints.save(manager, bad)
    assert manager.all_steps() == []
    manager.close()


def test_damaged_newest_step_falls_back_and_is_kept(tmp_path, config, fresh_state, caplog):
    workdir = str(tmp_path / "run")
    _save_steps(workdir, config, fresh_state)
    _damage(workdir, 6)
    with caplog.at_level(logging.WARNING):
        restored = _restore(workdir, config, fresh_state)
    assert int(restored.step) == 3
    _assert_params_of_step(restored, fresh_state, 3)
    warnings = [r.getMessage() for r in caplog.records if "step 6" in r.getMessage()]
    assert warnings and "unusable" in warnings[0] and "falling back to step 3" in warnings[0]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))  # Never deleted.


def test_training_sets_a_damaged_step_aside_so_it_can_be_written_again(
    tmp_path, config, fresh_state
):
    workdir = str(tmp_path / "run")
    _save_steps(workdir, config, fresh_state)
    _damage(workdir, 6)
    assert int(_restore(workdir, config, fresh_state, set_aside=True).step) == 3
    assert os.listdir(os.path.join(workdir, checkpoints.UNUSABLE_DIR)) == ["6"]
    manager = checkpoints.create_manager(workdir, config, for_training=True)
    assert manager.all_steps() == [3]
    checkpoints.save(manager, _state_at(fresh_state, 6))  # The resumed run reaches step 6 again.
    manager.close()
    _assert_params_of_step(_restore(workdir, config, fresh_state), fresh_state, 6)


@pytest.mark.parametrize("damage", ["item folder deleted", "tree metadata deleted", "all emptied"])
def test_other_damage_also_falls_back(tmp_path, config, fresh_state, damage):
    workdir = str(tmp_path / "run")
    _save_steps(workdir, config, fresh_state)
    step_dir = os.path.join(workdir, "checkpoints", "6")
    if damage == "item folder deleted":
        shutil.rmtree(os.path.join(step_dir, "default"))
    elif damage == "tree metadata deleted":
        os.remove(os.path.join(step_dir, "default", "_METADATA"))
    else:
        for folder, _, files in os.walk(step_dir):
            for name in files:
                open(os.path.join(folder, name), "w").close()
    assert int(_restore(workdir, config, fresh_state).step) == 3


def test_non_finite_checkpoint_on_disk_is_skipped(tmp_path, config, fresh_state):
    """A NaN checkpoint written by an older version is not resumed from."""
    import orbax.checkpoint as ocp

    workdir = str(tmp_path / "run")
    _save_steps(workdir, config, fresh_state, steps=(3,))
    bad = _state_at(fresh_state, 6)
    bad = bad.replace(params=jax.tree.map(lambda p: p * jnp.nan, bad.params))
    manager = checkpoints.create_manager(workdir, config, for_training=True)
    manager.save(6, args=ocp.args.StandardSave(checkpoints.state_to_dict(bad)))  # Bypasses save.
    manager.wait_until_finished()
    manager.close()
    assert int(_restore(workdir, config, fresh_state).step) == 3


def test_no_usable_checkpoint_lists_each_step(tmp_path, config, fresh_state):
    workdir = str(tmp_path / "run")
    _save_steps(workdir, config, fresh_state)
    _damage(workdir, 3)
    _damage(workdir, 6)
    with pytest.raises(checkpoints.CheckpointNotFoundError) as e:
        _restore(workdir, config, fresh_state)
    message = str(e.value)
    assert "step 6:" in message and "step 3:" in message and "\n" not in message


def test_missing_step_lists_the_steps_that_exist(tmp_path, config, fresh_state):
    workdir = str(tmp_path / "run")
    _save_steps(workdir, config, fresh_state)
    manager = checkpoints.create_manager(workdir, config)
    target = checkpoints.state_to_dict(fresh_state)
    with pytest.raises(checkpoints.CheckpointNotFoundError, match=r"step 999 .*steps there: 3, 6"):
        checkpoints.restore(manager, target, workdir, step=999)
    restored, step = checkpoints.restore(manager, target, workdir, step=3)
    manager.close()
    assert step == 3 and int(restored["step"]) == 3


def test_optimizer_structure_change_names_the_field_in_one_line(tmp_path, config, fresh_state):
    workdir = str(tmp_path / "run")
    _save_steps(workdir, config, fresh_state)
    clipped = config.copy_and_resolve_references()
    clipped.train.grad_clip_norm = 1.0
    # Caught before anything is built...
    with pytest.raises(checkpoints.IncompatibleCheckpointError) as e:
        checkpoints.check_compatible(clipped, workdir)
    assert "config.train.grad_clip_norm" in str(e.value) and "\n" not in str(e.value)
    # ...and, for fields no rule knows, by comparing the saved arrays with this config's state.
    clipped_state = train.create_train_state(clipped, jax.random.key(0), (16, 16, 1))
    with pytest.raises(checkpoints.IncompatibleCheckpointError) as e:
        _restore(workdir, clipped, clipped_state)
    message = str(e.value)
    assert "train.grad_clip_norm 0.0 -> 1.0" in message and "\n" not in message
    assert "opt_state" in message and len(message) < 600


def test_clip_value_change_keeps_the_state_compatible(tmp_path, config):
    workdir = str(tmp_path / "run")
    config = config.copy_and_resolve_references()
    config.train.grad_clip_norm = 1.0
    os.makedirs(workdir)
    checkpoints.write_config(config, workdir)
    config.train.grad_clip_norm = 2.0  # Still clipping: same optimiser state.
    checkpoints.check_compatible(config, workdir)


def test_training_removes_temporary_dirs_readers_do_not(tmp_path, config, fresh_state):
    workdir = str(tmp_path / "run")
    _save_steps(workdir, config, fresh_state, steps=(3,))
    leftover = os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(leftover, "default"))
    checkpoints.create_manager(workdir, config).close()  # A reader (inference, CLI).
    assert os.path.isdir(leftover)
    checkpoints.create_manager(workdir, config, for_training=True).close()
    assert not os.path.exists(leftover)
    assert int(_restore(workdir, config, fresh_state).step) == 3


def test_load_config_fills_fields_an_old_run_lacks(tmp_path, config, caplog):
    """A config.json written before data.align_margin (and a whole later section) existed still
    loads: the missing fields take configs/default.py's values, named in one warning."""
    import json

    from configs import default
    from facenet_jax.data.spec import DataSpec

    old = config.to_dict()
    del old["data"]["align_margin"]
    del old["eval"]
    old["data"]["image_size"] = 24  # A stored value is kept, whatever the default.
    (tmp_path / "config.json").write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING):
        loaded = checkpoints.load_config(str(tmp_path))
    defaults = default.get_config()
    assert loaded.data.align_margin == defaults.data.align_margin
    assert loaded.eval.to_dict() == defaults.eval.to_dict()
    assert loaded.data.image_size == 24 and loaded.model.to_dict() == config.model.to_dict()
    DataSpec.from_config(loaded.data)  # What every CLI command does with a run's config.
    lines = [r.getMessage() for r in caplog.records if "predates" in r.getMessage()]
    assert len(lines) == 1 and "data.align_margin" in lines[0] and "eval.split" in lines[0]
    assert "config.json" in lines[0]
    raw = checkpoints.load_config(str(tmp_path), fill_missing=False)
    assert "align_margin" not in raw.data and "eval" not in raw


def test_load_config_names_a_missing_or_empty_workdir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        checkpoints.load_config(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        checkpoints.load_config(str(tmp_path))
