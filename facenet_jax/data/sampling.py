"""Index samplers: PK batches for triplet training and padded, exhaustive evaluation batches.

Everything here is plain NumPy on indices, so the same sampler serves the bundled digits, folder
datasets and tfds catalog datasets. Batches are a pure function of ``(seed, step)``: a run resumed
at step ``s`` sees exactly the batches an uninterrupted run sees from step ``s`` on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from facenet_jax.labels import IGNORE_LABEL  # noqa: F401 (defined once, in facenet_jax.labels)


def group_by_label(labels: np.ndarray, min_count: int = 1) -> dict[int, np.ndarray]:
    """Maps each label to the sorted indices carrying it, keeping labels with >= min_count items."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    uniq, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    return {
        int(u): np.sort(order[s : s + c])
        for u, s, c in zip(uniq, starts, counts, strict=True)
        if c >= min_count and u != IGNORE_LABEL
    }


def turned(index, turn, turns: int):
    """``rotation_classes``' one numbering rule: ``index * turns + turn``.

    Identity ``i`` turned ``turn`` of ``turns`` (r * 360 / R degrees) is the class
    ``turned(i, r, R)``; record ``j`` turned the same way is the sampler entry ``turned(j, r, R)``,
    which ``divmod(entry, R)`` undoes. Works on ints and broadcasting arrays.
    """
    return index * turns + turn


def pk_batch_indices(
    identity_to_indices: Sequence[np.ndarray],
    *,
    p: int,
    k: int,
    seed: int,
    step: int,
    replace: bool = True,
    identity_groups: Sequence[int | str] | np.ndarray | None = None,
    groups_per_batch: int = 0,
) -> np.ndarray:
    """Indices of the global PK batch for one training step.

    The batch is P identities x K images, identity-major: rows ``[i*K, (i+1)*K)`` hold identity i.
    Identities are drawn without replacement from those eligible; within an identity, K images are
    drawn without replacement when it has >= K images, otherwise (``replace=True``) with
    replacement after taking every image once. With ``replace=False`` identities with fewer than
    K images are never drawn.

    With ``groups_per_batch`` G >= 1 (``config.data.groups_per_batch``) the P identities come
    from G groups (demographic groups, alphabets): G distinct groups drawn uniformly among those
    with >= P / G eligible identities, then P / G identities of each, group-major. Every negative
    the miner sees is then from one of G groups: G = 1 trains on within-group impostors only.
    G = 0 ignores groups (and draws exactly the batches it drew before the option existed).

    Args:
      identity_to_indices: for each identity, the dataset indices of its images.
      p: identities per batch (P).
      k: images per identity (K >= 2).
      seed: run seed.
      step: training step; the batch is a pure function of (seed, step).
      replace: whether identities with < K images may be sampled (with repeated images).
      identity_groups: [len(identity_to_indices)] group of each identity, ints or names (G >= 1
        only); an error lists them.
      groups_per_batch: G; 0 = ignore groups. P must be divisible by G.

    Returns:
      [P*K] int64 dataset indices.
    """
    if k < 2:
        raise ValueError(f"images_per_identity (K) must be >= 2 so anchors have positives, got {k}")
    eligible = [i for i, idx in enumerate(identity_to_indices) if len(idx) >= (2 if replace else k)]
    if len(eligible) < p:
        raise ValueError(
            f"identities_per_batch (P) = {p} but only {len(eligible)} identities have enough "
            f"images (>= {2 if replace else k}); lower config.data.identities_per_batch"
            + ("" if replace else " or images_per_identity, or set sample_with_replacement=True")
        )
    rng = np.random.default_rng([seed, step, 0x9E3779B9])
    if groups_per_batch:
        if identity_groups is None or len(identity_groups) != len(identity_to_indices):
            raise ValueError("groups_per_batch needs the group of every identity")
        groups = np.asarray(identity_groups)[eligible]
        chosen = _grouped_choice(rng, groups, p, groups_per_batch)
    else:
        chosen = rng.choice(len(eligible), size=p, replace=False)
    out = np.empty((p, k), dtype=np.int64)
    for row, c in enumerate(chosen):
        idx = np.asarray(identity_to_indices[eligible[c]])
        if len(idx) >= k:
            out[row] = rng.choice(idx, size=k, replace=False)
        else:
            extra = rng.choice(idx, size=k - len(idx), replace=True)
            out[row] = rng.permutation(np.concatenate([idx, extra]))
    return out.reshape(-1)


def _grouped_choice(rng: np.random.Generator, groups: np.ndarray, p: int, g: int) -> np.ndarray:
    """[P] positions into ``groups`` (the eligible identities' groups): P / G from each of G
    distinct groups, drawn uniformly among the groups with >= P / G identities."""
    if p % g:
        raise ValueError(
            f"identities_per_batch (P) = {p} is not divisible by config.data.groups_per_batch "
            f"(G) = {g}: each of the G groups gives P / G identities"
        )
    per = p // g
    names, counts = np.unique(groups, return_counts=True)
    able = names[counts >= per]
    if len(able) < g:
        have = ", ".join(f"{n}: {c}" for n, c in zip(names, counts, strict=True))
        raise ValueError(
            f"config.data.groups_per_batch (G) = {g} draws P / G = {per} identities from each of "
            f"G groups, but only {len(able)} groups have >= {per} drawable training identities "
            f"(per group: {have}); lower config.data.groups_per_batch or identities_per_batch"
        )
    picked = rng.choice(able, size=g, replace=False)
    return np.concatenate(
        [rng.choice(np.flatnonzero(groups == n), size=per, replace=False) for n in picked]
    )


def process_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """The contiguous rows of the global batch that one JAX process loads.

    Rows are identity-major, so when P is a multiple of the process count every process holds
    whole identities, which keeps ``mining_scope=local`` meaningful.
    """
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the process count "
            f"{process_count}"
        )
    per = global_batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def eval_batch_indices(num_items: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Visits every item exactly once in fixed-size batches.

    Yields ``(indices, valid)``: [batch_size] int64 indices (the last batch is padded by repeating
    index 0) and a [batch_size] bool mask that is False on padding rows, whose label must be set to
    ``IGNORE_LABEL``.
    """
    for start in range(0, num_items, batch_size):
        idx = np.arange(start, min(start + batch_size, num_items), dtype=np.int64)
        valid = np.ones(batch_size, dtype=bool)
        valid[len(idx) :] = False
        yield np.pad(idx, (0, batch_size - len(idx))), valid
