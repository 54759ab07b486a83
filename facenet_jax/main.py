"""Trains and evaluates a FaceNet embedding.

    python -m facenet_jax.main --config=configs/default.py --workdir=/tmp/run

This file is kept short on purpose: flags, logging and process setup; the work is done by
``facenet_jax.train.train_and_evaluate``. Any config field can be overridden with
``--config.<field>=<value>``, e.g. ``--config.train.margin=0.3``.

Exit codes: 0 done; 1 an error in the run (one line on stderr; ``--verbosity=1`` shows the
traceback and the libraries' INFO logs); 2 a command-line mistake; 128 + N stopped by signal N
(SIGTERM 143, SIGINT 130) after saving a checkpoint: the same command resumes.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from facenet_jax import checkpoints, parallel, train, usage
from facenet_jax import workdir as workdir_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and evaluation outputs.")
flags.DEFINE_string(
    "coordinator_address", "", 'Multi-process: host:port of process 0, or "auto" (TPU pod slices).'
)
flags.DEFINE_integer("num_processes", 0, "Multi-process: number of JAX processes.")
flags.DEFINE_integer("process_id", -1, "Multi-process: index of this process.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
OWN_FLAGS = ("config", "workdir", "coordinator_address", "num_processes", "process_id", "verbosity")

# Mistakes of the user or the environment: reported in one line, not as a traceback.
USER_ERRORS = (
    ValueError,  # Bad config values (validate_config names the field), bad data.
    OSError,  # Missing files and folders, permissions, a full disk.
    workdir_lib.WorkdirLockedError,
    checkpoints.CheckpointNotFoundError,
    train.NonFiniteError,
)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flags_parser: --help with the config fields, one-line flag and config errors."""
    if any(arg in usage.HELP_FLAGS for arg in argv[1:]):
        flags_help = "\n".join(f"  --{name}: {FLAGS[name].help}" for name in OWN_FLAGS)
        usage.print_help(argv, __doc__, flags_help)
    usage.preflight(argv)
    try:
        return FLAGS(argv)
    except flags.Error as e:
        usage.fail(e, usage.USAGE_ERROR, hint=False)


def main(argv):
    if len(argv) > 1:
        usage.fail(f"unexpected arguments {argv[1:]}", usage.USAGE_ERROR, hint=False)
    if not FLAGS["verbosity"].present:  # Quiet by default: warnings and the result only.
        logging.set_verbosity(logging.WARNING)
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
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except train.Preempted as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(128 + e.signal_number)
    except KeyboardInterrupt:
        if usage.verbose():
            raise
        usage.fail("interrupted", 130, hint=False)
    except USER_ERRORS as e:
        if usage.verbose():
            raise
        usage.fail(e)


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
