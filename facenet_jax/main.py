"""Trains and evaluates a FaceNet embedding.

    python -m facenet_jax.main --config=configs/default.py --workdir=/tmp/run

This file is kept short on purpose: flags, logging and process setup; the work is done by
``facenet_jax.train.train_and_evaluate``. Any config field can be overridden with
``--config.<field>=<value>``, e.g. ``--config.train.margin=0.3``.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from facenet_jax import parallel, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and evaluation outputs.")
flags.DEFINE_string(
    "coordinator_address", "", 'Multi-process: host:port of process 0, or "auto" (TPU pod slices).'
)
flags.DEFINE_integer("num_processes", 0, "Multi-process: number of JAX processes.")
flags.DEFINE_integer("process_id", -1, "Multi-process: index of this process.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    parallel.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    logging.info(
        "process %d of %d; devices: %d local, %d global",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
