"""Embedding losses, as pure functions of ``(embeddings, labels, ...)``.

* ``triplet`` (``losses/triplet.py``): the FaceNet triplet loss with online mining (batch-all,
  batch-hard, semi-hard, hardest, random), exact and O(B^2) memory, over a block of anchors so a
  device can mine its own anchors against the all-gathered global batch. ``losses/tiles.py`` holds
  the anchor-block and tiled column-reduction machinery under it.
* ``margin`` (``losses/margin.py``): softmax, NormFace, CosFace and ArcFace cross entropy over the
  training identities with a class-weight matrix [C, d], as additive terms over a block of rows.

``from facenet_jax import losses; losses.triplet_loss(...)`` and
``from facenet_jax.losses import triplet_terms`` both work: this module re-exports the public API.
"""

from facenet_jax.losses.margin import (
    MARGIN_KINDS,
    MarginTerms,
    init_class_weights,
    margin_softmax_loss,
    margin_softmax_terms,
    margin_terms_to_loss,
    normalize_class_weights,
)
from facenet_jax.losses.triplet import (
    STRATEGIES,
    TripletTerms,
    anchor_negative_mask,
    anchor_positive_mask,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    semi_hard_triplet_loss,
    terms_to_loss,
    triplet_loss,
    triplet_mask,
    triplet_terms,
)

__all__ = [
    "MARGIN_KINDS",
    "MarginTerms",
    "init_class_weights",
    "margin_softmax_loss",
    "margin_softmax_terms",
    "margin_terms_to_loss",
    "normalize_class_weights",
    "STRATEGIES",
    "TripletTerms",
    "anchor_negative_mask",
    "anchor_positive_mask",
    "batch_all_triplet_loss",
    "batch_hard_triplet_loss",
    "semi_hard_triplet_loss",
    "terms_to_loss",
    "triplet_loss",
    "triplet_mask",
    "triplet_terms",
]
