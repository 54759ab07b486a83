"""BFW, a first try of the published recipe (configs/bfw.py) in under 15 minutes on 2 CPU cores.

The same data, alignment, backbone and loss as ``configs/bfw.py``, with a short schedule:

  python -m facenet_jax.main --config=configs/bfw_quick.py --workdir=DIR

What it reaches, with the command and the wall time, is in docs/results.md.
"""

from configs import bfw


def get_config():
    config = bfw.get_config()
    config.train.num_steps = 250  # Estimated < 15 min with a warm landmark cache; not yet timed.
    config.train.warmup_steps = 25  # Linear warm-up before the cosine decay.
    config.train.log_every = 50  # Log every 50 steps.
    config.train.checkpoint_every = 125  # Checkpoint every 125 steps.
    return config
