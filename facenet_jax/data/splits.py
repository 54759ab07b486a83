"""Identity splits: which records are train, val and test, deterministically.

``split_indices`` partitions record indices by identity (disjoint identities, stratified over
groups: BFW keeps 10 of each demographic group's 100 people for test) or by image (closed-set
evaluation), seeded by ``config.data.split_seed``. The folder and tfds catalog sources split with
it; the bundled digit sources construct their own splits (``digits.py``).
"""

from __future__ import annotations

import numpy as np

from facenet_jax.data import sampling
from facenet_jax.data.spec import SPLIT_BY, DataSpec

SPLITS = ("train", "val", "test")


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


def split_indices(
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    by: str = "identity",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    min_images: int = 2,
) -> dict[str, np.ndarray]:
    """Deterministic train/val/test record indices.

    by="identity": identities with >= min_images images are shuffled within each group and
    round(fraction * n_group) of them go to val and to test, the rest to train (disjoint
    identities). Identities with fewer images cannot form triplets: they go to val/test (in the
    ratio val_fraction : test_fraction) as distractors, or stay in train (unsampled) when both
    fractions are 0.
    by="image": every identity keeps round(fraction * n) of its images, shuffled, for val and for
    test (at least 2 stay in train); identities with < min_images images go to test (val if
    test_fraction is 0) as distractors.

    Args:
      labels: [N] int identity label of every record.
      groups: [N] int group of every record (None: one group).

    Returns:
      {"train", "val", "test"}: sorted int64 record indices, a partition of range(N).
    """
    labels = np.asarray(labels)
    groups = np.zeros_like(labels) if groups is None else np.asarray(groups)
    if by not in SPLIT_BY:
        raise ValueError(f"config.data.split_by: unknown value {by!r}; allowed: {list(SPLIT_BY)}")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            "config.data.val_fraction and test_fraction must be >= 0 with a sum < 1, got "
            f"{val_fraction} and {test_fraction}"
        )
    rng = np.random.default_rng([seed, 0x5B117])
    by_label = sampling.group_by_label(labels)
    small = [lab for lab, idx in by_label.items() if len(idx) < min_images]
    held = val_fraction + test_fraction
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}

    def distractor_split() -> str:
        if held == 0:
            return "train"
        return "val" if rng.random() < val_fraction / held else "test"

    if by == "identity":
        group_of = {lab: int(groups[idx[0]]) for lab, idx in by_label.items()}
        for g in sorted(set(group_of.values())):
            ids = [lab for lab in by_label if group_of[lab] == g and lab not in small]
            ids = list(rng.permutation(ids)) if ids else []
            n_val, n_test = _round(val_fraction * len(ids)), _round(test_fraction * len(ids))
            for j, lab in enumerate(ids):
                name = "val" if j < n_val else "test" if j < n_val + n_test else "train"
                out[name].append(by_label[int(lab)])
        for lab in small:
            out[distractor_split()].append(by_label[lab])
    else:
        for lab, idx in by_label.items():
            if lab in small:
                name = "test" if test_fraction > 0 else "val" if val_fraction > 0 else "train"
                out[name].append(idx)
                continue
            idx = rng.permutation(idx)
            n_val, n_test = _round(val_fraction * len(idx)), _round(test_fraction * len(idx))
            while len(idx) - n_val - n_test < 2:
                n_test, n_val = (n_test - 1, n_val) if n_test >= n_val else (n_test, n_val - 1)
            out["val"].append(idx[:n_val])
            out["test"].append(idx[n_val : n_val + n_test])
            out["train"].append(idx[n_val + n_test :])
    return {
        s: np.sort(np.concatenate(v)).astype(np.int64) if v else np.zeros(0, np.int64)
        for s, v in out.items()
    }


def split_for_spec(
    labels: np.ndarray, groups: np.ndarray | None, spec: DataSpec
) -> dict[str, np.ndarray]:
    """``split_indices`` with the spec's split_by, fractions, split_seed and min_images."""
    return split_indices(
        labels,
        groups,
        by=spec.split_by,
        val_fraction=spec.val_fraction,
        test_fraction=spec.test_fraction,
        seed=spec.split_seed,
        min_images=spec.min_images,
    )
