"""Identity splits: which records are train, val and test, deterministically.

``split_indices`` partitions record indices by identity (disjoint identities, stratified over
groups: BFW keeps 10 of each demographic group's 100 people for test) or by image (closed-set
evaluation), seeded by ``config.data.split_seed``. The folder and tfds catalog sources split with
it; the bundled digit sources construct their own splits (``digits.py``).

``check_feasible`` says, before anything is compiled, whether a split can feed training and
evaluation: the train split needs P identities that the PK sampler can draw (each with
``need = max(2, min_images_per_identity)`` images, or K with ``sample_with_replacement=False``),
and the evaluated split (``config.eval.split``) >= 2 identities, one of them with >= 2 images (a
same and a different pair). Its error names the fields to change, with values that work where one
exists (the smallest held-out fraction, in steps of 0.05). ``check_listing`` runs the same check on
the files a folder lists, before they are decoded, and raises only when the failure is certain
whatever files turn out undecodable (so it never refuses a run that preparation would allow).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from facenet_jax.data import sampling
from facenet_jax.data.spec import SPLIT_BY, DataSpec

SPLITS = ("train", "val", "test")


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


def held_images(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """by="image": (val, test) images held out of an identity's n, keeping >= 2 for training."""
    n_val, n_test = _round(val_fraction * n), _round(test_fraction * n)
    while n - n_val - n_test < 2:
        n_test, n_val = (n_test - 1, n_val) if n_test >= n_val else (n_test, n_val - 1)
    return n_val, n_test


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
            n_val, n_test = held_images(len(idx), val_fraction, test_fraction)
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


# ------------------------------------------------------------------------------ feasibility


def _need(spec: DataSpec) -> int:
    """Images a train identity needs for the PK sampler to draw it."""
    return (
        spec.min_images
        if spec.sample_with_replacement
        else max(spec.min_images, spec.images_per_identity)
    )


def _problems(
    labels: np.ndarray, parts: dict[str, np.ndarray], spec: DataSpec, eval_split: str
) -> dict[str, tuple[int, ...]]:
    """{"train": (drawable identities,)} and/or {"eval": (identities, with >= 2 images)} when
    the train split cannot fill P, or the evaluated split cannot give a same and a different pair.

    With ``rotation_classes`` R each drawable identity is R sampled identities (its turned
    images, ``records.RecordDataset``), so P is checked against R x the drawable identities.
    """
    out = {}
    train = np.bincount(labels[parts["train"]]) if len(parts["train"]) else np.zeros(0, int)
    drawable = int((train >= _need(spec)).sum()) * spec.rotation_classes
    if drawable < spec.identities_per_batch:
        out["train"] = (drawable,)
    held = parts[eval_split]
    counts = np.bincount(labels[held]) if len(held) else np.zeros(0, int)
    n, same = int((counts > 0).sum()), int((counts >= 2).sum())
    if n < 2 or same < 1:
        out["eval"] = (n, same)
    return out


def _split(labels, groups, spec: DataSpec, **fields) -> dict[str, np.ndarray]:
    return split_for_spec(labels, groups, dataclasses.replace(spec, **fields) if fields else spec)


def _smallest_fraction(labels, groups, spec: DataSpec, field: str, eval_split: str) -> float | None:
    """The smallest ``field`` (val_ or test_fraction, steps of 0.05) with a feasible split."""
    other = spec.test_fraction if field == "val_fraction" else spec.val_fraction
    for f in np.arange(1, 20) * 0.05:
        f = round(float(f), 2)
        if f + other >= 1:
            break
        if f > getattr(spec, field) and not _problems(
            labels, _split(labels, groups, spec, **{field: f}), spec, eval_split
        ):
            return f
    return None


def _message(labels, groups, parts, spec: DataSpec, eval_split: str, problems, what: str) -> str:
    """One paragraph naming every problem and the config fields that fix it."""
    counts = {s: len(np.unique(labels[parts[s]])) for s in SPLITS}
    splits_text = ", ".join(f"{counts[s]} in {s}" for s in SPLITS)
    total = len(np.unique(labels))
    fractions = spec.source in ("folder", "tfds")
    lines = []
    if "train" in problems:
        (drawable,) = problems["train"]
        p, need = spec.identities_per_batch, _need(spec)
        fixes = [f"set config.data.identities_per_batch <= {drawable}"] if drawable >= 2 else []
        if not spec.sample_with_replacement:
            spec_r = dataclasses.replace(spec, sample_with_replacement=True)
            if "train" not in _problems(labels, parts, spec_r, eval_split):
                fixes.append(
                    "set config.data.sample_with_replacement=True (identities with fewer than "
                    f"K = {spec.images_per_identity} images are then drawn with repeats)"
                )
        if spec.min_images_per_identity > 2:
            spec_m = dataclasses.replace(spec, min_images_per_identity=2)
            if "train" not in _problems(labels, _split(labels, groups, spec_m), spec_m, eval_split):
                fixes.append("lower config.data.min_images_per_identity")
        if fractions and spec.split_by == "identity" and spec.val_fraction + spec.test_fraction:
            fixes.append(
                "lower config.data.val_fraction / config.data.test_fraction (now "
                f"{spec.val_fraction} / {spec.test_fraction}), which hold identities out of "
                "training"
            )
        turns = spec.rotation_classes
        sampled = (
            f"{drawable} identities with >= {need} images"
            if turns == 1
            else f"{drawable // turns} identities with >= {need} images (x config.data."
            f"rotation_classes = {turns}: {drawable} sampled identities)"
        )
        lines.append(
            f"config.data.identities_per_batch (P) = {p}, but the train split of {what} has "
            f"{sampled} ({total} identities: {splits_text}); "
            + ("; or ".join(fixes) if fixes else "add identities")
        )
    if "eval" in problems:
        n, same = problems["eval"]
        field = f"{'val' if eval_split == 'val' else 'test'}_fraction"
        fixes = []
        if fractions:
            f = _smallest_fraction(labels, groups, spec, field, eval_split)
            if f is not None:
                fixes.append(f"raise config.data.{field} (now {getattr(spec, field)}) to {f}")
        else:
            fixes.append(f"source {spec.source!r} holds out fixed identities")
        other = "val" if eval_split == "test" else "test"
        if other in parts and "eval" not in _problems(labels, parts, spec, other):
            fixes.append(f"set config.eval.split={other!r}")
        if not fixes or fixes[0].startswith("source"):
            fixes.append(
                f"add identities: {what} is too small for a train / val / test split by "
                f"{spec.split_by} with P = {spec.identities_per_batch} (val_fraction "
                f"{spec.val_fraction}, test_fraction {spec.test_fraction})"
            )
        lines.append(
            f"config.eval.split = {eval_split!r}, but the {eval_split} split of {what} holds "
            f"{n} identities, {same} with >= 2 images ({total} identities: {splits_text}), and "
            "verification needs >= 2 identities and one with >= 2 images; " + "; or ".join(fixes)
        )
    return "\n".join(lines)


def check_feasible(
    labels: np.ndarray,
    groups: np.ndarray | None,
    spec: DataSpec,
    eval_split: str,
    parts: dict[str, np.ndarray] | None = None,
    *,
    what: str = "the data",
) -> None:
    """Raises ValueError, naming the config fields to change, when the split cannot train or
    evaluate (see the module docstring).

    Args:
      labels: [N] int identity of every record; groups: [N] int group (None: one group).
      spec: the run's data spec (P, K, min_images_per_identity, sampling, split fields).
      eval_split: ``config.eval.split``, the split the run evaluates.
      parts: the split ({"train", "val", "test"}: record indices); None: ``split_for_spec``.
      what: names the data in the message (the folder, the tfds dataset).
    """
    labels = np.asarray(labels, np.int64)
    groups = np.zeros_like(labels) if groups is None else np.asarray(groups, np.int64)
    parts = split_for_spec(labels, groups, spec) if parts is None else parts
    if eval_split not in parts:
        raise ValueError(f"config.eval.split: {eval_split!r}; allowed: {sorted(parts)}")
    problems = _problems(labels, parts, spec, eval_split)
    if problems:
        raise ValueError(_message(labels, groups, parts, spec, eval_split, problems, what))


def _max_train(n: int, spec: DataSpec) -> int:
    """by="identity": the most identities a group of <= n eligible ones keeps for training."""
    f, t = spec.val_fraction, spec.test_fraction
    return max((m - _round(f * m) - _round(t * m) for m in range(n + 1)), default=0)


def check_listing(
    labels: np.ndarray, groups: np.ndarray | None, spec: DataSpec, eval_split: str, what: str
) -> None:
    """``check_feasible`` on the files a folder lists (``labels``: one per file), before decoding.

    Decoding can only drop files, so this raises only when every outcome fails: the train bound
    is, per group, the most identities any smaller set of eligible identities leaves for training
    (rounding makes that count non-monotone), and the evaluated split's bound counts every
    identity that could be held out with >= 2 images. Otherwise the exact check runs on the
    prepared records (``records.RecordDataset.check_feasible``).
    """
    labels = np.asarray(labels, np.int64)
    groups = np.zeros_like(labels) if groups is None else np.asarray(groups, np.int64)
    parts = split_for_spec(labels, groups, spec)
    if eval_split not in parts:
        raise ValueError(f"config.eval.split: {eval_split!r}; allowed: {sorted(parts)}")
    problems = _problems(labels, parts, spec, eval_split)
    if not problems:
        return
    ids, first = np.unique(labels, return_index=True)
    counts, group = np.bincount(labels)[ids], groups[first]
    eligible, drawable = counts >= spec.min_images, counts >= _need(spec)
    fraction = spec.val_fraction if eval_split == "val" else spec.test_fraction
    if spec.split_by == "identity":
        train_bound = sum(
            min(int(drawable[group == g].sum()), _max_train(int(eligible[group == g].sum()), spec))
            for g in np.unique(group)
        )
        held_bound = sum(
            _round(fraction * int(eligible[group == g].sum())) for g in np.unique(group)
        )
    else:
        train_bound = int(drawable.sum())
        side = int(eval_split != "val")  # held_images -> (val, test)
        most = [
            max(
                held_images(m, spec.val_fraction, spec.test_fraction)[side] for m in range(2, n + 1)
            )
            for n in counts[eligible].tolist()
        ]
        held_bound = sum(h >= 2 for h in most)
    if spec.val_fraction + spec.test_fraction > 0 and spec.min_images > 2:
        # An identity dropping below min_images is held out as a distractor, with a pair.
        held_bound += int((counts >= 2).sum())
    certain = {}
    if "train" in problems and train_bound * spec.rotation_classes < spec.identities_per_batch:
        certain["train"] = problems["train"]
    if "eval" in problems and held_bound == 0:
        certain["eval"] = problems["eval"]
    if certain:
        raise ValueError(
            _message(labels, groups, parts, spec, eval_split, certain, what)
            + "\n(counted from the files listed, before decoding them)"
        )
