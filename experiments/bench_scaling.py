"""Data-parallel scaling: train-step throughput on 1, 2, 4, 8 devices at the same global batch.

    python experiments/bench_scaling.py --config=configs/default.py [--devices=1,2,4,8]
        [--scopes=global,local] [--platform=cpu] [--config.<field>=<value> ...]

Each device count runs in a fresh subprocess (on CPU with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``: N fake devices sharing this machine's
cores; on an accelerator the first N real devices). It compiles ``train.make_train_step`` on a
1-D mesh of N devices, runs ``--warmup`` untimed steps on one fixed global batch, then times
``--repeats`` windows of ``--steps`` steps and keeps the fastest (input pipeline excluded).
Prints a markdown table of steps/s, images/s, the per-device batch and the compile time, for
each mining scope.

On CPU the fake devices share the same cores, so this shows overhead, not speed-up: splitting
the step adds work (smaller per-device ops, collectives, the all-gather of global mining) and no
compute. Where one device's program leaves cores idle, N devices running at once may fill them,
a gain bounded by the core count, not data-parallel scaling. docs/parallel.md keeps measured
tables and how to read them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from facenet_jax import parallel, train  # noqa: E402
from facenet_jax.data import input_pipeline  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/default.py", "Configuration file.")
flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts to measure.")
flags.DEFINE_list("scopes", ["global", "local"], "Mining scopes to measure (train.mining_scope).")
flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu", "tpu"], "Platform to measure on.")
flags.DEFINE_integer("steps", 20, "Timed steps per measurement.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation, caches).")
flags.DEFINE_integer("repeats", 3, "Timed windows of --steps steps; the fastest is reported.")
flags.DEFINE_integer("worker", 0, "Internal: measure on this many devices and print JSON.")
flags.DEFINE_integer("timeout", 1200, "Seconds allowed per subprocess.")


def measure(config, num_devices: int, steps: int, warmup: int, repeats: int) -> dict[str, float]:
    """Steps/s of the compiled train step on the first ``num_devices`` devices, fixed batch.

    The fastest of ``repeats`` windows of ``steps`` steps: other load on the machine only ever
    slows a window down, so the best one is the closest to the step's own cost.
    """
    if jax.device_count() < num_devices:
        raise ValueError(f"--devices: asked for {num_devices}, only {jax.device_count()} exist")
    mesh = parallel.create_mesh(jax.devices()[:num_devices])
    dataset = input_pipeline.create_dataset(config)
    state = parallel.replicate(
        train.create_train_state(config, jax.random.key(config.seed), dataset.image_shape), mesh
    )
    step_fn = train.make_train_step(config, mesh)
    batch = parallel.shard_batch(next(dataset.train_batches(0)), mesh)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    seconds = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        seconds = min(seconds, time.perf_counter() - start)
    global_batch = config.data.identities_per_batch * config.data.images_per_identity
    return {
        "devices": num_devices,
        "steps_per_s": steps / seconds,
        "images_per_s": steps * global_batch / seconds,
        "global_batch": global_batch,
        "per_device_batch": global_batch // num_devices,
        "compile_s": compile_s,
        "device_kind": jax.devices()[0].device_kind,
    }


def _run_worker(num_devices: int, scope: str) -> dict[str, float]:
    """One measurement in a fresh interpreter (the device count is fixed at JAX start-up)."""
    env = dict(os.environ, JAX_PLATFORMS=FLAGS.platform)
    if FLAGS.platform == "cpu":
        flag = f"--xla_force_host_platform_device_count={num_devices}"
        env["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), flag]).strip()
    passthrough = [a for a in sys.argv[1:] if a.startswith("--config")]
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        *passthrough,
        f"--config.train.mining_scope={scope}",
        f"--worker={num_devices}",
        f"--steps={FLAGS.steps}",
        f"--warmup={FLAGS.warmup}",
        f"--repeats={FLAGS.repeats}",
    ]
    out = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=FLAGS.timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    config = FLAGS.config
    if FLAGS.worker:
        result = measure(config, FLAGS.worker, FLAGS.steps, FLAGS.warmup, FLAGS.repeats)
        print(json.dumps(result), flush=True)
        return
    d = config.data
    print(
        f"{config.model.name} ({config.model.dtype}), {d.image_size}x{d.image_size}x{d.channels}, "
        f"global batch {d.identities_per_batch * d.images_per_identity} "
        f"(P {d.identities_per_batch} x K {d.images_per_identity}), {config.train.mining} mining; "
        f"best of {FLAGS.repeats} x {FLAGS.steps} timed steps after {FLAGS.warmup}; "
        f"{FLAGS.platform}, host "
        f"{_cpu_name()} x {os.cpu_count()} cores, jax {jax.__version__}"
    )
    print()
    first = FLAGS.devices[0]
    print(f"| scope | devices | per-device batch | steps/s | images/s | vs {first} | compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for scope in FLAGS.scopes:
        base = None
        for n in (int(x) for x in FLAGS.devices):
            r = _run_worker(n, scope)
            base = base or r["images_per_s"]
            print(
                f"| {scope} | {n} | {r['per_device_batch']} | {r['steps_per_s']:.2f} | "
                f"{r['images_per_s']:.0f} | {r['images_per_s'] / base:.2f}x | "
                f"{r['compile_s']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
