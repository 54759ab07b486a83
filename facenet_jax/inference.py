"""Loading a trained run for inference: ``load_embedder(workdir)`` -> ``Embedder``.

The embedder rebuilds the model from ``WORKDIR/config.json``, restores the latest (or a given)
checkpoint, and embeds preprocessed images or image files with the run's own preprocessing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from facenet_jax import checkpoints, models


class Embedder:
    """A trained embedding network f: images [N, H, W, C] in [-1, 1] -> [N, d] unit vectors."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        params,
        batch_stats,
        step: int,
    ):
        self.config = config
        self.step = step
        self.variables = {"params": params, "batch_stats": batch_stats}
        self.model = models.create_model(config.model)
        self._apply = jax.jit(lambda v, x: self.model.apply(v, x, train=False))
        leaves = jax.tree.leaves(params)
        digest = hashlib.sha256()
        digest.update(config.model.to_json(sort_keys=True).encode())
        for leaf in leaves:
            digest.update(np.asarray(leaf, np.float32).tobytes())
        #: Identifies the exact weights; stored with galleries so a gallery is never used with
        #: another model.
        self.fingerprint = f"{config.model.name}-step{step}-{digest.hexdigest()[:16]}"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        d = self.config.data
        return (d.image_size, d.image_size, d.channels)

    def embed(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """images: [N, H, W, C] float32 in [-1, 1] -> [N, d] float32 unit vectors.

        Batches are padded to ``batch_size`` so only one shape is ever compiled.
        """
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != self.image_shape:
            raise ValueError(
                f"expected images [N, {', '.join(map(str, self.image_shape))}], got {images.shape}"
            )
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            n = len(chunk)
            if n < batch_size and len(images) > batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]))])
            out.append(np.asarray(self._apply(self.variables, jnp.asarray(chunk)))[:n])
        if not out:
            return np.zeros((0, self.config.model.embedding_dim), np.float32)
        return np.concatenate(out)

    def embed_paths(
        self,
        paths: Sequence[str],
        batch_size: int = 256,
        flip: bool = False,
        progress: bool = False,
    ) -> np.ndarray:
        """Loads image files with the run's preprocessing and embeds them.

        With ``flip``, the embedding is that of the image plus its horizontal mirror,
        re-normalised (test-time augmentation).
        """
        from facenet_jax.data import preprocessing

        iterator = range(0, len(paths), batch_size)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="embed", unit="batch")
        out = []
        for start in iterator:
            images = np.stack(
                [
                    preprocessing.load_image(p, self.config.data)
                    for p in paths[start : start + batch_size]
                ]
            )
            emb = self.embed(images, batch_size)
            if flip:
                emb = emb + self.embed(images[:, :, ::-1], batch_size)
                emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            out.append(emb)
        if not out:
            return np.zeros((0, self.config.model.embedding_dim), np.float32)
        return np.concatenate(out)


def load_embedder(workdir: str, step: int | None = None) -> Embedder:
    """Restores the model of a training run (latest checkpoint unless ``step`` is given)."""
    from facenet_jax import train  # Deferred: train imports the whole stack.

    config = checkpoints.load_config(workdir)
    manager = checkpoints.create_manager(workdir, config)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint found in {workdir!r}/checkpoints")
    d = config.data
    # Shapes only (no compilation, no memory): the restore target.
    abstract = jax.eval_shape(
        lambda: checkpoints.state_to_dict(
            train.create_train_state(
                config, jax.random.key(0), (d.image_size, d.image_size, d.channels)
            )
        )
    )
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    manager.close()
    return Embedder(config, restored["params"], restored["batch_stats"], int(step))


def untrained_embedder(workdir: str) -> Embedder:
    """The run's network at initialisation: same config and seed as its step 0, no training.

    This is the untrained baseline that ``eval.json`` reports next to the trained network.
    """
    from facenet_jax import train  # Deferred: train imports the whole stack.

    config = checkpoints.load_config(workdir)
    d = config.data
    state = train.create_train_state(
        config, jax.random.key(config.seed), (d.image_size, d.image_size, d.channels)
    )
    return Embedder(config, state.params, state.batch_stats, 0)
