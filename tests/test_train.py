"""Train step, end-to-end smoke run, resume, config validation, and the run's fault handling:
the non-finite guard, SIGTERM / SIGINT, resuming past a damaged checkpoint, the workdir lock."""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import smoke
from facenet_jax import checkpoints, metric_logging, parallel, train, workdir
from facenet_jax.data import input_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_steps_lower_the_loss_on_a_fixed_batch():
    config = smoke.get_config()
    config.train.learning_rate = 3e-3
    config.train.schedule = "constant"
    mesh = parallel.create_mesh(jax.devices()[:1])
    ds = input_pipeline.create_dataset(config)
    batch = parallel.shard_batch(next(ds.train_batches(0)), mesh)
    state = parallel.replicate(
        train.create_train_state(config, jax.random.key(0), ds.image_shape), mesh
    )
    step = train.make_train_step(config, mesh)
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 8
    assert losses[-1] < 0.7 * losses[0], losses
    for key in ("fraction_active", "mean_pos_dist", "mean_neg_dist", "learning_rate"):
        assert np.isfinite(float(metrics[key])), key


def test_end_to_end_smoke_run_writes_outputs_and_resumes(tmp_path):
    config = smoke.get_config()
    workdir = str(tmp_path / "run")
    first = train.train_and_evaluate(config, workdir)
    for name in ("metrics.jsonl", "eval.json", "config.json", "roc.png", "eval_baseline.json"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert os.path.isdir(os.path.join(workdir, "tensorboard"))
    records = metric_logging.read_metrics(workdir)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    for r in train_records:
        assert {"fraction_active", "mean_pos_dist", "mean_neg_dist", "images_per_sec"} <= set(r)
    with open(os.path.join(workdir, "eval.json")) as f:
        result = json.load(f)
    assert 0.0 <= result["trained"]["accuracy"] <= 1.0
    assert result["trained"]["step"] == 6 == first["step"]
    assert "untrained" in result

    # Resume: raise num_steps; the run continues from the step-6 checkpoint, not from 0.
    config.train.num_steps = 9
    resumed = train.train_and_evaluate(config, workdir)
    assert resumed["step"] == 9
    steps = [r["step"] for r in metric_logging.read_metrics(workdir) if "loss" in r]
    assert steps == [2, 4, 6, 8, 9]


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    """Interrupt at the step-3 checkpoint, restart: same final parameters as one clean run."""
    config = smoke.get_config()
    config.eval.baseline = False
    full = str(tmp_path / "full")
    train.train_and_evaluate(config, full)
    part = str(tmp_path / "part")
    config.train.num_steps = 3
    train.train_and_evaluate(config, part)
    config.train.num_steps = 6
    train.train_and_evaluate(config, part)
    a = _restore_params(full, config)
    b = _restore_params(part, config)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _restore_params(workdir, config):
    manager = checkpoints.create_manager(workdir, config)
    state = train.create_train_state(config, jax.random.key(0), (16, 16, 1))
    state = checkpoints.restore_latest(manager, state, workdir)
    assert int(state.step) == 6
    return state.params


def test_incompatible_checkpoint_is_refused(tmp_path):
    config = smoke.get_config()
    config.train.num_steps = 3
    config.eval.baseline = False
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    config.model.embedding_dim = 32
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match="config.model.embedding_dim"):
        train.train_and_evaluate(config, workdir)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("train.mining", "hardestest", "config.train.mining"),
        ("train.optimizer", "lamb2", "config.train.optimizer"),
        ("train.mining_scope", "galaxy", "config.train.mining_scope"),
        ("data.images_per_identity", 1, "images_per_identity"),
        ("model.name", "vgg99", "config.model.name"),
    ],
)
def test_bad_config_fails_at_startup_naming_the_field(field, value, match):
    config = smoke.get_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=match):
        train.validate_config(config)


def test_collapse_message_flags_only_a_collapsed_embedding():
    # Logged metrics of real default-config runs (docs/ablations.md): batch_hard at step 50, and
    # semi_hard at step 50.
    collapsed = {"mean_pos_dist": 0.0028, "mean_neg_dist": 0.0013, "fraction_active": 1.0}
    healthy = {"mean_pos_dist": 0.53, "mean_neg_dist": 0.71, "fraction_active": 0.68}
    message = train.collapse_message(collapsed)
    assert message is not None and "collapsed" in message and "semi_hard" in message
    assert train.collapse_message(healthy) is None
    # Positives merged but negatives apart is not a collapse; nor is a batch with nothing valid.
    assert train.collapse_message({**collapsed, "mean_neg_dist": 0.5}) is None
    assert train.collapse_message({**collapsed, "num_valid": 0}) is None


def test_collapse_message_does_not_recommend_the_mining_in_use():
    collapsed = {"mean_pos_dist": 0.0, "mean_neg_dist": 0.0, "fraction_active": 1.0}
    t = smoke.get_config().train
    t.mining, t.learning_rate = "semi_hard", 1e9
    message = train.collapse_message(collapsed, t)
    assert "train.mining=semi_hard" not in message and "already on" in message
    assert "config.train.learning_rate (now 1e+09)" in message
    t.mining = "batch_hard"
    assert "train.mining=semi_hard" in train.collapse_message(collapsed, t)


# ----------------------------------------------------------------------------- the step's inputs


def test_train_step_receives_schedule_loss_settings_and_seed():
    """The step uses the schedule it is given (Flax's train_step(state, batch, learning_rate_fn)),
    not one rebuilt from a config; loss settings and seed are bound where it is compiled."""
    config = smoke.get_config()
    mesh = parallel.create_mesh(jax.devices()[:1])
    ds = input_pipeline.create_dataset(config)
    batch = parallel.shard_batch(next(ds.train_batches(0)), mesh)

    def schedule(step):
        return 1e-4 * (step + 7)

    state = parallel.replicate(
        train.create_train_state(config, jax.random.key(0), ds.image_shape), mesh
    )
    step_fn = train.make_train_step(config, mesh, learning_rate_fn=schedule)
    for expected_step in range(3):
        state, metrics = step_fn(state, batch)
        assert float(metrics["learning_rate"]) == pytest.approx(schedule(expected_step))
    settings = train.LossSettings.from_config(config.train)
    assert (settings.mining, settings.margin, settings.scope) == ("semi_hard", 0.2, "global")
    hash(settings)  # Static: usable as a jit/partial constant.


# ----------------------------------------------------------------------------- non-finite guard


def _nan_images(batch):
    return {**batch, "image": np.full_like(batch["image"], np.nan)}


class _HookedDataset:
    """The run's dataset, but the batch of step s goes through ``hooks[s]`` (each hook once)."""

    def __init__(self, dataset, hooks):
        self._dataset, self._hooks = dataset, hooks

    def __getattr__(self, name):
        return getattr(self._dataset, name)

    def train_batches(self, start_step, *args):
        batches = self._dataset.train_batches(start_step, *args)
        for step, batch in enumerate(batches, start_step + 1):
            hook = self._hooks.pop(step, None)
            yield hook(batch) if hook else batch


@pytest.fixture
def hook_batches(monkeypatch):
    """``hook_batches({step: fn})``: the run's dataset applies fn to that step's batch."""
    original = input_pipeline.create_dataset

    def install(hooks):
        monkeypatch.setattr(
            input_pipeline, "create_dataset", lambda config: _HookedDataset(original(config), hooks)
        )

    return install


def _fault_config(**train_fields):
    config = smoke.get_config()
    config.eval.baseline = False
    config.train.log_every = 1
    for k, v in train_fields.items():
        config.train[k] = v
    return config


def _steps_on_disk(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def test_nonfinite_update_is_dropped_by_the_step():
    config = smoke.get_config()
    mesh = parallel.create_mesh(jax.devices()[:1])
    ds = input_pipeline.create_dataset(config)
    batch = parallel.shard_batch(_nan_images(next(ds.train_batches(0))), mesh)
    state = parallel.replicate(
        train.create_train_state(config, jax.random.key(0), ds.image_shape), mesh
    )
    before = parallel.fetch({"params": state.params, "opt": state.opt_state})
    state, metrics = train.make_train_step(config, mesh)(state, batch)
    after = parallel.fetch({"params": state.params, "opt": state.opt_state})
    code = int(metrics["nonfinite"])
    names = [n for i, n in enumerate(train.NONFINITE_PARTS) if code >> i & 1]
    assert "gradients" in names and "parameters" in names, names
    assert int(state.step) == 1  # The step advances (the data stays aligned with the step)...
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)  # ...the update does not happen.


def test_diverging_run_stops_naming_step_metric_and_last_good_checkpoint(tmp_path):
    """The issue's learning_rate=1e38: the loss stays finite while gradients and parameters
    overflow. No non-finite checkpoint is written, no evaluation is reported."""
    config = _fault_config(
        learning_rate=1e38, schedule="constant", checkpoint_every=1, log_every=100
    )
    run = str(tmp_path / "run")
    with pytest.raises(train.NonFiniteError) as e:
        train.train_and_evaluate(config, run)
    message = str(e.value)
    assert "step 2: non-finite gradients" in message and "loss 0.2" in message, message
    assert f"last good checkpoint: step 1 in {os.path.join(run, 'checkpoints')}" in message
    assert "config.train.learning_rate" in message
    assert _steps_on_disk(run) == [1]
    manager = checkpoints.create_manager(run, config)
    state = train.create_train_state(config, jax.random.key(0), (16, 16, 1))
    restored = checkpoints.restore_latest(manager, state, run)
    manager.close()
    assert bool(checkpoints.all_finite(checkpoints.state_to_dict(restored)))
    assert not os.path.exists(os.path.join(run, "eval.json"))
    assert not os.path.exists(workdir.lock_path(run))  # Released on the way out.


def test_skip_mode_drops_bad_steps_and_stops_after_too_many_in_a_row(tmp_path, hook_batches):
    config = _fault_config(on_nonfinite="skip", max_nonfinite_skips=2)
    run = str(tmp_path / "skip")
    hook_batches({4: _nan_images})
    result = train.train_and_evaluate(config, run)
    assert result["step"] == 6 and np.isfinite(result["accuracy"])
    records = {r["step"]: r for r in metric_logging.read_metrics(run) if "loss" in r}
    assert records[4]["skipped_updates"] == 1 and records[4]["grad_norm"] == "nan"
    assert [records[s]["skipped_updates"] for s in (1, 2, 3, 5, 6)] == [0] * 5

    run = str(tmp_path / "skip_twice")
    hook_batches({4: _nan_images, 5: _nan_images})
    with pytest.raises(train.NonFiniteError, match=r"step 5: .*2 non-finite steps in a row"):
        train.train_and_evaluate(config, run)
    assert _steps_on_disk(run) == [3] and not os.path.exists(os.path.join(run, "eval.json"))


# ----------------------------------------------------------------------------- preemption


@pytest.fixture(scope="module")
def uninterrupted_params(tmp_path_factory):
    config = _fault_config(checkpoint_every=100)
    run = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    train.train_and_evaluate(config, run)
    return _restore_params(run, config)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_current_step_and_resume_is_bit_identical(
    tmp_path, hook_batches, uninterrupted_params, signum
):
    config = _fault_config(checkpoint_every=100)  # Only the signal and the end save.
    run = str(tmp_path / "run")

    def send_signal(batch):  # Arrives while step 4's batch is read, as a preemption would.
        os.kill(os.getpid(), signum)
        return batch

    hook_batches({4: send_signal})
    previous_handler = signal.getsignal(signum)
    with pytest.raises(train.Preempted) as e:
        train.train_and_evaluate(config, run)
    assert (e.value.step, e.value.signal_number) == (4, signum)
    assert f"saved checkpoint step 4 in {os.path.join(run, 'checkpoints')}" in str(e.value)
    assert signal.getsignal(signum) is previous_handler  # Handlers restored.
    assert _steps_on_disk(run) == [4]
    assert [r["step"] for r in metric_logging.read_metrics(run)] == [1, 2, 3, 4]
    assert not os.path.exists(workdir.lock_path(run))

    train.train_and_evaluate(config, run)  # The same command resumes.
    steps = [r["step"] for r in metric_logging.read_metrics(run) if "loss" in r]
    assert steps == list(range(1, 7))  # Each step once.
    resumed = _restore_params(run, config)
    for a, b in zip(jax.tree.leaves(uninterrupted_params), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- resuming


def _tensorboard_view(logdir):
    """{tag: [steps]} as TensorBoard shows the event files: a SessionLog.START at step T purges
    the earlier events at steps >= T (how resumed runs hide what they log again)."""
    from tensorboardX.proto import event_pb2

    shown = {}
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                shown = {t: [s for s in v if s < event.step] for t, v in shown.items()}
            for value in event.summary.value:
                shown.setdefault(value.tag, []).append(event.step)
    return shown


def test_resume_past_a_damaged_checkpoint_logs_each_step_once(tmp_path):
    config = _fault_config()
    run = str(tmp_path / "run")
    train.train_and_evaluate(config, run)
    assert _steps_on_disk(run) == [3, 6]
    for folder, _, files in os.walk(os.path.join(run, "checkpoints", "6")):
        for name in files:
            if os.path.basename(folder) == "d":  # Array data: truncated, as by a full disk.
                with open(os.path.join(folder, name), "r+b") as f:
                    f.truncate(10)

    result = train.train_and_evaluate(config, run)  # Falls back to step 3, redoes 4..6.
    assert result["step"] == 6
    assert _steps_on_disk(run) == [3, 6]
    assert os.listdir(os.path.join(run, checkpoints.UNUSABLE_DIR)) == ["6"]  # Kept, not deleted.
    records = metric_logging.read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval/accuracy" in r] == [6]
    shown = _tensorboard_view(os.path.join(run, "tensorboard"))
    assert shown["loss"] == [1, 2, 3, 4, 5, 6] and shown["eval/accuracy"] == [6]

    train.train_and_evaluate(config, run)  # A finished run, run again: evaluated, logged once.
    assert [r["step"] for r in metric_logging.read_metrics(run) if "eval/accuracy" in r] == [6]


# ----------------------------------------------------------------------------- workdir lock


def test_run_on_a_workdir_held_by_a_live_process_is_refused(tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with open(workdir.lock_path(run), "w") as f:
            json.dump(
                {
                    "pid": holder.pid,
                    "host": socket.gethostname(),
                    "purpose": "train",
                    "since": time.time(),
                    "token": "x",
                },
                f,
            )
        with pytest.raises(workdir.WorkdirLockedError, match=f"in use by pid {holder.pid} "):
            train.train_and_evaluate(smoke.get_config(), run)
        assert os.listdir(run) == [workdir.LOCK_NAME]  # Nothing written, the lock untouched.
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- margin-softmax terms


def test_loss_terms_parse_terms_and_weights():
    t = smoke.get_config().train
    assert train.loss_terms(t) == {"triplet": 1.0}
    t.loss, t.loss_weights = "triplet + arcface", (1.0, 0.25)
    assert train.loss_terms(t) == {"triplet": 1.0, "arcface": 0.25}
    t.margin_m = 0.5
    s = train.LossSettings.from_config(t)
    assert (s.triplet_weight, s.margin_kind, s.margin_weight, s.margin_m) == (
        1.0,
        "arcface",
        0.25,
        0.5,
    )
    t.loss, t.loss_weights = "normface", ()
    s = train.LossSettings.from_config(t)
    assert (s.triplet_weight, s.margin_kind, s.margin_weight) == (0.0, "normface", 1.0)
    assert s.margin_m == 0.0  # normface has no margin: margin_m is not passed on.


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"loss": "triplet+hinge"}, "config.train.loss: unknown term 'hinge'"),
        ({"loss": "cosface+arcface"}, "config.train.loss: at most one margin-softmax kind"),
        ({"loss": "triplet+triplet"}, "config.train.loss: a term is repeated"),
        ({"loss": ""}, "config.train.loss must be a string"),
        ({"loss": "triplet+cosface", "loss_weights": (1.0,)}, "config.train.loss_weights: 1"),
        ({"loss": "cosface", "loss_weights": (-1.0,)}, "config.train.loss_weights: the weight"),
        ({"loss": "cosface", "loss_weights": (0.0,)}, "config.train.loss_weights: the weight"),
        ({"loss": "arcface", "margin_m": 2.0}, "config.train.margin_m: arcface"),
        ({"loss": "cosface", "margin_m": -0.1}, "config.train.margin_m: cosface"),
        ({"loss": "normface", "margin_scale": 0.0}, "config.train.margin_scale"),
        ({"loss": "cosface", "easy_margin": True}, "config.train.easy_margin"),
    ],
)
def test_bad_loss_config_fails_at_startup_naming_the_field(fields, match):
    config = smoke.get_config()
    for k, v in fields.items():
        config.train[k] = v
    with pytest.raises(ValueError, match=match):
        train.validate_config(config)


def test_class_labels_are_contiguous_over_the_sampled_training_identities():
    labels = np.array([7, 3, 3, 9, 7, 7, 12, 5, 5, 3, 12])
    train_idx = np.array([0, 1, 2, 3, 4, 5, 9])  # 7 x3, 3 x3, 9 x1; 12 and 5 are held out.
    classes = train.training_classes(labels, train_idx, min_images=2)
    assert classes.tolist() == [3, 7]  # 9 has one training image: never sampled, no class.
    batch = np.array([7, 3, 7, -1, 12, 9, 3])
    reference = [{3: 0, 7: 1}.get(int(y), -1) for y in batch]
    got = train.to_class_labels(batch, classes)
    assert got.dtype == np.int32 and got.tolist() == reference
    assert train.to_class_labels(batch, classes[:0]).tolist() == [-1] * len(batch)

    ds = input_pipeline.create_dataset(smoke.get_config())
    classes = train.dataset_classes(ds)
    assert len(classes) == ds.split_info("train")["num_identities"] == 80
    batch = next(ds.train_batches(0))["label"]
    mapped = train.to_class_labels(batch, classes)
    assert mapped.min() >= 0 and mapped.max() < 80 and np.array_equal(classes[mapped], batch)


def test_margin_step_learns_the_class_weights_on_a_fixed_batch():
    config = smoke.get_config()
    config.train.loss = "cosface"
    config.train.schedule = "constant"
    mesh = parallel.create_mesh(jax.devices()[:1])
    ds = input_pipeline.create_dataset(config)
    classes = train.dataset_classes(ds)
    batch = next(ds.train_batches(0))
    batch["label"] = train.to_class_labels(batch["label"], classes)
    batch = parallel.shard_batch(batch, mesh)
    state = train.create_train_state(
        config, jax.random.key(0), ds.image_shape, num_classes=len(classes)
    )
    assert state.class_weights.shape == (80, config.model.embedding_dim)
    with pytest.raises(ValueError, match="num_classes"):
        train.create_train_state(config, jax.random.key(0), ds.image_shape)
    state = parallel.replicate(state, mesh)
    step = train.make_train_step(config, mesh)
    history = []
    for _ in range(15):
        state, metrics = step(state, batch)
        history.append(parallel.fetch(metrics))
    first, last = history[0], history[-1]
    assert last["margin_loss"] < 0.5 * first["margin_loss"], [h["margin_loss"] for h in history]
    assert last["margin_accuracy"] > first["margin_accuracy"]
    assert last["margin_mean_target_cos"] > first["margin_mean_target_cos"]
    assert last["loss"] == pytest.approx(last["margin_loss"])  # cosface alone, weight 1.
    # The same step with a triplet-only state is a caller bug, refused at trace time.
    triplet_state = train.create_train_state(smoke.get_config(), jax.random.key(0), ds.image_shape)
    with pytest.raises(ValueError, match="class weights"):
        step(parallel.replicate(triplet_state, mesh), batch)


def test_margin_run_checkpoints_w_resumes_exactly_and_inference_drops_it(tmp_path):
    from facenet_jax import inference

    config = smoke.get_config()
    config.train.loss, config.train.loss_weights = "triplet+cosface", (1.0, 0.5)
    full = str(tmp_path / "full")
    train.train_and_evaluate(config, full)
    logged = [r for r in metric_logging.read_metrics(full) if "loss" in r]
    for r in logged:
        assert {"margin_loss", "margin_accuracy", "triplet_loss", "fraction_active"} <= set(r)
        assert r["loss"] == pytest.approx(r["triplet_loss"] + 0.5 * r["margin_loss"], rel=1e-5)
    with open(os.path.join(full, "eval.json")) as f:
        assert {"trained", "untrained"} <= set(json.load(f))  # Evaluation as for any run.

    config.eval.baseline = False
    part = str(tmp_path / "part")
    config.train.num_steps = 3
    train.train_and_evaluate(config, part)
    config.train.num_steps = 6
    train.train_and_evaluate(config, part)  # Resumes W and its optimiser state at step 3.
    states = []
    for run in (full, part):
        manager = checkpoints.create_manager(run, config)
        state = train.create_train_state(config, jax.random.key(0), (16, 16, 1), num_classes=80)
        state = checkpoints.restore_latest(manager, state, run)
        manager.close()
        assert int(state.step) == 6
        states.append(state)
    init = train.create_train_state(config, jax.random.key(0), (16, 16, 1), num_classes=80)
    assert np.abs(np.asarray(states[0].class_weights - init.class_weights)).max() > 1e-4
    for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)

    embedder = inference.load_embedder(full, mesh=parallel.create_mesh(jax.devices()[:1]))
    assert embedder.step == 6 and set(embedder.variables) == {"params", "batch_stats"}
    for x, y in zip(
        jax.tree.leaves(embedder.variables["params"]),
        jax.tree.leaves(states[0].params),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_triplet_state_keeps_its_checkpoint_layout_and_refuses_a_margin_config(tmp_path):
    config = smoke.get_config()
    state = train.create_train_state(config, jax.random.key(0), (16, 16, 1))
    assert state.class_weights is None
    assert set(checkpoints.state_to_dict(state)) == {"step", "params", "batch_stats", "opt_state"}
    # The optimiser state is over the model params alone, as before class weights existed.
    expected = train.create_optimizer(config).init(state.params)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(expected)

    config.train.num_steps = 3
    config.eval.baseline = False
    run = str(tmp_path / "run")
    train.train_and_evaluate(config, run)
    config.train.loss = "cosface"
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match="train.loss"):
        train.train_and_evaluate(config, run)


# ------------------------------------------------------------------- split and P x K feasibility


def test_an_infeasible_folder_split_fails_before_preparation(tmp_path):
    """P larger than the train identities failed after preparation, compilation and the baseline
    evaluation, suggesting sample_with_replacement, which is already set."""
    from tests.data import trees

    root, data_dir, run = tmp_path / "faces", tmp_path / "tfds", tmp_path / "run"
    trees.make_tree(str(root), groups=1, ids_per_group=6, images=3)
    config = trees.folder_config(str(root), str(data_dir))
    config.data.identities_per_batch = 8
    with pytest.raises(ValueError) as e:
        train.train_and_evaluate(config, str(run))
    message = str(e.value)
    assert "config.data.identities_per_batch (P) = 8" in message
    assert "set config.data.identities_per_batch <= 2" in message  # 6 - round(1.5) - round(1.5)
    assert "sample_with_replacement" not in message
    assert not os.path.exists(data_dir) and not os.path.exists(run)  # Nothing prepared or written.
    config.data.identities_per_batch = 2
    config.data.val_fraction = config.data.test_fraction = 0.05  # round(0.3) = 0 test identities.
    with pytest.raises(ValueError, match=r"config.eval.split = 'test'.*raise config.data.test_"):
        train.train_and_evaluate(config, str(run))
    assert not os.path.exists(data_dir) and not os.path.exists(run)


def test_an_infeasible_split_fails_before_compiling(tmp_path, monkeypatch):
    from tests.data import trees

    def compile_step(*args, **kwargs):
        raise AssertionError("compiled although the split cannot train or evaluate")

    monkeypatch.setattr(train, "make_train_step", compile_step)
    config = smoke.get_config()
    config.data.identities_per_batch = 81  # digit_pairs: 80 training numbers.
    with pytest.raises(ValueError, match=r"\(P\) = 81, but the train split .* has 80 identities"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    # One test identity (round(0.6) = 1): certain only once decoded (a bad file could turn a
    # training identity into a held-out distractor), so refused after preparation.
    root = tmp_path / "faces"
    trees.make_tree(str(root), groups=1, ids_per_group=6, images=3)
    config = trees.folder_config(str(root), str(tmp_path / "tfds"))
    config.data.identities_per_batch = 2
    config.data.val_fraction = config.data.test_fraction = 0.1
    with pytest.raises(ValueError, match=r"holds 1 identities.*raise config.data.test_fraction"):
        train.train_and_evaluate(config, str(tmp_path / "run2"))
