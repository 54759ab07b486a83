"""Input throughput vs train-step consumption: is the input ever what the train step waits on?

    python experiments/bench_input.py --config=configs/bfw.py [--config.data.root=PATH]

Measures on this machine, at the config's input size and PK batch:
  1. the training iterator alone (prepared folder -> grain -> augmented PK batches), images/s,
     for several grain worker counts (``--workers``);
  2. the compiled train step alone on a fixed batch (``facenet_jax.train.make_train_step``),
     images/s;
  3. the train step fed by the iterator (``config.data.num_workers``), images/s.
The input meets its target when (1) >= 2x (2) with the config's worker count, and (3) ~= (2).
Prints a markdown table (docs/input.md keeps the measured one).
"""

from __future__ import annotations

import os
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from facenet_jax import parallel, train
from facenet_jax.data import input_pipeline

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/bfw.py", "Configuration file.")
flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts for the iterator alone.")
flags.DEFINE_integer("steps", 40, "Timed iterator steps per measurement (after warm-up).")
flags.DEFINE_integer("train_steps", 10, "Timed train steps per measurement (after warm-up).")
flags.DEFINE_integer("warmup", 2, "Untimed steps first (worker start-up, compilation).")
flags.DEFINE_bool("fed", True, "Also time the train step fed by the iterator.")


def _time_iterator(config, steps: int, warmup: int) -> float:
    """Images/s of ``train_batches`` alone."""
    dataset = input_pipeline.create_dataset(config)
    batches = dataset.train_batches(0)
    try:
        for _ in range(warmup):
            next(batches)
        start, n = time.perf_counter(), 0
        for _ in range(steps):
            n += len(next(batches)["label"])
        return n / (time.perf_counter() - start)
    finally:
        batches.close()


def _time_train_step(config, steps: int, warmup: int, feed=None) -> float:
    """Images/s of the compiled train step, on one fixed batch or fed by ``feed``."""
    dataset = input_pipeline.create_dataset(config)
    mesh = parallel.create_mesh()
    state = train.create_train_state(config, jax.random.key(0), dataset.image_shape)
    state = parallel.replicate(state, mesh)
    step_fn = train.make_train_step(config, mesh)
    batches = dataset.train_batches(0)
    try:
        fixed = parallel.shard_batch(next(batches), mesh)
        for _ in range(warmup):
            state, metrics = step_fn(
                state, fixed if feed is None else parallel.shard_batch(next(batches), mesh)
            )
        jax.block_until_ready(metrics)
        start, n = time.perf_counter(), 0
        for _ in range(steps):
            batch = fixed if feed is None else parallel.shard_batch(next(batches), mesh)
            state, metrics = step_fn(state, batch)
            n += config.data.identities_per_batch * config.data.images_per_identity
        jax.block_until_ready(metrics)
        return n / (time.perf_counter() - start)
    finally:
        batches.close()


def main(argv):
    del argv
    config = FLAGS.config
    d = config.data
    b = d.identities_per_batch * d.images_per_identity
    print(
        f"config: source={d.source} root={d.root} image_size={d.image_size} "
        f"channels={d.channels} crop={d.crop} augment={tuple(d.augment)} batch={b} "
        f"(P {d.identities_per_batch} x K {d.images_per_identity}) model={config.model.name} "
        f"width={config.model.width}"
    )
    print(
        f"machine: {os.cpu_count()} CPU cores, JAX {jax.__version__} on "
        f"{jax.devices()[0].platform} x {jax.device_count()}, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    input_pipeline.create_dataset(config)  # Prepare the folder once, outside the timings.
    rows = []

    def report(name: str, rate: float) -> None:
        rows.append((name, rate))
        print(f"{name}: {rate:,.0f} images/s", flush=True)

    for w in (int(x) for x in FLAGS.workers):
        c = config.copy_and_resolve_references()
        c.data.num_workers = w
        report(f"iterator alone, {w} grain workers", _time_iterator(c, FLAGS.steps, FLAGS.warmup))
    step_rate = _time_train_step(config, FLAGS.train_steps, FLAGS.warmup)
    report("train step alone (fixed batch)", step_rate)
    if FLAGS.fed:
        fed = _time_train_step(config, FLAGS.train_steps, FLAGS.warmup, feed=True)
        report(f"train step fed by the iterator ({d.num_workers} workers)", fed)
    print("\n| what | images/s | x train step |\n|---|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate / step_rate:.2f} |")
    config_rate = dict(rows).get(f"iterator alone, {d.num_workers} grain workers")
    if config_rate is not None:
        verdict = "meets" if config_rate >= 2 * step_rate else "MISSES"
        print(
            f"\niterator at config.data.num_workers={d.num_workers}: "
            f"{config_rate / step_rate:.2f}x the train step ({verdict} the 2x target)"
        )


if __name__ == "__main__":
    app.run(main)
