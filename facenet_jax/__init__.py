"""facenet_jax: FaceNet face embeddings with the triplet loss in JAX/Flax."""

__version__ = "0.1.0"
