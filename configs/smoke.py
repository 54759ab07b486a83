"""Smoke test: the default (bundled digit pairs) shrunk to a few seconds of training, for tests."""

from configs import default


def get_config():
    config = default.get_config()
    config.data.image_size = 16  # Tiny inputs: compile and run in seconds.
    config.data.identities_per_batch = 4  # P: 4 training numbers per batch.
    config.data.images_per_identity = 4  # K: 16 images per global batch.
    config.model.width = 8  # A narrow CNN.
    config.model.embedding_dim = 16  # A short embedding.
    config.train.num_steps = 6  # A handful of steps.
    config.train.warmup_steps = 2  # Warm-up shorter than the run.
    config.train.log_every = 2  # Log often enough to see every code path.
    config.train.checkpoint_every = 3  # Checkpoint mid-run, to test resuming.
    config.train.progress_bar = False  # No tqdm output in test logs.
    config.eval.num_pairs = 200  # Few verification pairs.
    config.eval.num_folds = 5  # Few folds.
    config.eval.batch_size = 128  # Eval batches over the 600 unseen-number images, the last padded.
    return config
