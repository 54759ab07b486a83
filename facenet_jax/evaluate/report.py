"""The one evaluation path: embedded images -> protocols -> JSON record and plots.

Training's end-of-run evaluation and every ``facenet-jax`` evaluation command go through here,
so a checkpoint evaluated from the command line gives the numbers its run wrote::

    image files / a dataset split
      -> inference.Embedder.embed_set / embed_split     ImageSet: embeddings [N, d], labels
      -> evaluate_set: same/different pairs (verification.sample_pairs, settings.seed)
           verification  -> verification.verification_metrics (accuracy, 10-fold, AUC, EER, TAR@FAR)
           groups        -> verification.group_metrics (grouped sets: per group, global threshold)
           retrieval     -> retrieval.retrieval_metrics (recall@k, MAP@R)
           open_set      -> open_set.open_set_protocol (calibrate, enrol, identify, reject)
           + similarity_head scores of the same pairs, when a fitted head is given
      -> write: metrics.json, roc.png, distances.png, embeddings.png, group bars  (``write``)

    a pairs file (LFW pairs.txt, CSV) -> evaluate_pairs (pairs.protocol_metrics) -> write
    a labelled set -> run_episodes (episodes.episodes) -> episodes_<way>way_<shot>shot.json

A training run evaluates with ``Settings.of_run(config)`` (verification only, impostors from any
identity, ``config.eval`` pairs and folds, ``config.seed``); ``run_record`` is its flat eval.json
entry and ``write_run`` its workdir files (eval.json, roc.png with the untrained baseline,
distances.png, embeddings.png). JSON is written by ``write_json`` only: atomically, and never with
NaN or infinities (a ValueError names the key); undefined values are None.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import ml_collections
import numpy as np

from facenet_jax.evaluate import open_set, plots, retrieval, verification
from facenet_jax.evaluate.episodes import episodes
from facenet_jax.evaluate.pairs import Pairs, protocol_metrics
from facenet_jax.evaluate.similarity_head import SimilarityHead, head_distances

PROTOCOLS = ("verification", "groups", "retrieval", "open_set")
IMPOSTORS = ("group", "any")


# ------------------------------------------------------------------------------------ JSON


def jsonable(obj: Any, key: str = "") -> Any:
    """``obj`` with NumPy values as Python ones; ValueError naming the key of a NaN or infinity."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v, f"{key}.{k}" if key else str(k)) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, list | tuple):
        return [jsonable(v, f"{key}[{n}]") for n, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{key or 'value'} is {obj}: JSON records hold finite numbers or None")
    return obj


def write_json(path: str, obj: Any) -> str:
    """Writes ``obj`` as sorted, indented JSON atomically (temporary file, then ``os.replace``).

    Raises ValueError naming the file and the key when a value is NaN or infinite.
    """
    try:
        text = json.dumps(jsonable(obj), indent=2, sort_keys=True, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"not writing {path}: {e}") from e
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------- protocols


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the protocols of a labelled set are run with.

    Attributes:
      num_pairs: same/different pairs sampled for verification (half of each).
      num_folds: folds of the k-fold accuracy (a pairs file's own folds take precedence).
      seed: seeds the pairs, the folds and the open-set split.
      impostors: with several groups, "group" draws impostor pairs within the probe's group (the
        BFW protocol), "any" from any identity (what a training run's evaluation does).
      far: open-set target false-accept rate; shots: open-set images enrolled per person.
      protocols: the subset of ``PROTOCOLS`` to run.
    """

    num_pairs: int = 6000
    num_folds: int = 10
    seed: int = 0
    impostors: str = "group"
    far: float = 1e-3
    shots: int = 1
    protocols: tuple[str, ...] = PROTOCOLS

    def __post_init__(self):
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad:
            raise ValueError(f"unknown protocol(s) {bad}; valid: {list(PROTOCOLS)}")
        if self.impostors not in IMPOSTORS:
            raise ValueError(f"impostors: {self.impostors!r}; valid: {list(IMPOSTORS)}")

    @classmethod
    def of_run(cls, config: ml_collections.ConfigDict) -> Settings:
        """A training run's evaluation: ``config.eval`` pairs and folds, ``config.seed``."""
        e = config.eval
        return cls(e.num_pairs, e.num_folds, config.seed, "any", protocols=("verification",))


@dataclasses.dataclass
class Report:
    """Protocol results and what their plots need.

    Attributes:
      metrics: the JSON record (see ``evaluate_set`` / ``evaluate_pairs``).
      verification: the verification metrics of ``distances`` (accuracy, threshold, auc, ...).
      distances, issame: [P] the verification pairs' squared distances and ground truth.
      embedded: the embedded set (None for a pairs file).
      fold: [P] the pairs file's fold of each pair, if it defines folds.
    """

    metrics: dict[str, Any]
    verification: dict[str, Any]
    distances: np.ndarray
    issame: np.ndarray
    embedded: Any = None
    fold: np.ndarray | None = None


def evaluate_set(embedded, settings: Settings, head: SimilarityHead | None = None) -> Report:
    """Runs ``settings.protocols`` on an embedded ``inference.ImageSet``.

    Returns:
      A Report whose metrics hold one entry per protocol run (``verification``, ``groups`` when
      the set has several groups, ``retrieval``, ``open_set``), ``similarity_head`` (the head's
      scores of the same pairs) when ``head`` is given, ``negative_pairs``, ``num_images`` and
      ``num_identities``.
    """
    emb, labels, groups = embedded.embeddings, embedded.labels, embedded.groups
    grouped = len(embedded.group_names) > 1
    # With groups, impostor pairs stay within a group (the BFW protocol): a group's FAR then
    # measures confusions between its own members, not with easier, other-group faces.
    within = grouped and settings.impostors == "group"
    s = settings
    i, j, issame = verification.sample_pairs(
        labels, s.num_pairs, s.seed, groups if within else None
    )
    dist = verification.pair_distances(emb, i, j)
    ver = verification.verification_metrics(dist, issame, s.num_folds, s.seed)
    metrics: dict[str, Any] = {}
    if "verification" in s.protocols:
        metrics["verification"] = ver
    if "groups" in s.protocols and grouped:
        pair_group = verification.pair_groups(groups, i, j)
        metrics["groups"] = verification.group_metrics(
            dist, issame, pair_group, embedded.group_names
        )
    if "retrieval" in s.protocols:
        metrics["retrieval"] = retrieval.retrieval_metrics(emb, labels)
    if "open_set" in s.protocols:
        metrics["open_set"] = open_set.open_set_protocol(
            emb, labels, target_far=s.far, shots=s.shots, seed=s.seed
        )
    if head is not None:
        scores = head_distances(head, emb[i], emb[j])
        metrics["similarity_head"] = verification.verification_metrics(
            scores, issame, s.num_folds, s.seed
        )
    metrics.update(
        negative_pairs="within group" if within else "any identity",
        num_images=len(labels),
        num_identities=int(len(np.unique(labels))),
    )
    return Report(metrics, ver, dist, issame, embedded)


def evaluate_pairs(
    embeddings: np.ndarray, pairs: Pairs, settings: Settings, head: SimilarityHead | None = None
) -> Report:
    """The LFW View 2 protocol on the pairs of a file; ``embeddings`` [P, d] of ``pairs.paths``.

    Returns:
      A Report whose metrics are ``pairs.protocol_metrics`` plus ``similarity_head`` (when
      ``head`` is given), ``pairs_file`` and ``num_images``.
    """
    s = settings
    dist = verification.pair_distances(embeddings, pairs.i, pairs.j)
    metrics = protocol_metrics(dist, pairs.issame, pairs.fold, s.num_folds, s.seed)
    if head is not None:
        scores = head_distances(head, embeddings[pairs.i], embeddings[pairs.j])
        metrics["similarity_head"] = protocol_metrics(
            scores, pairs.issame, pairs.fold, s.num_folds, s.seed
        )
    metrics.update(pairs_file=pairs.source, num_images=len(pairs.paths))
    return Report(metrics, metrics, dist, pairs.issame, fold=pairs.fold)


# ----------------------------------------------------------------------------------- output


def roc(report: Report) -> dict[str, list[float]]:
    """``{"far": [...], "tar": [...]}``: the ROC of the report's verification pairs."""
    far, tar, _ = verification.roc_curve(report.distances, report.issame)
    return {"far": far.tolist(), "tar": tar.tolist()}


def write_plots(
    report: Report, out_dir: str, label: str, other_rocs: dict[str, dict] | None = None
) -> list[str]:
    """roc.png (this report's ROC as ``label``, plus ``other_rocs``: name -> ``roc`` dict with
    an ``auc``), distances.png, and for an embedded set embeddings.png and, with groups,
    group_accuracy.png / group_far.png. Returns the paths written."""
    rocs = {label: roc(report) | {"auc": report.verification["auc"]}, **(other_rocs or {})}
    curves = {
        f"{name} (AUC {r['auc']:.4f})": (np.asarray(r["far"]), np.asarray(r["tar"]))
        for name, r in rocs.items()
    }
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731
    threshold = report.verification["threshold"]
    written = [
        plots.plot_roc(curves, path("roc.png")),
        plots.plot_distance_histograms(
            report.distances, report.issame, threshold, path("distances.png")
        ),
    ]
    if report.embedded is not None:
        e = report.embedded
        written.append(plots.plot_embeddings_2d(e.embeddings, e.names, path("embeddings.png")))
    by_group = report.metrics.get("groups", {}).get("groups", {})
    if by_group:
        for name, key, ylabel in (
            ("group_accuracy.png", "accuracy", "accuracy"),
            ("group_far.png", "far_at_global_threshold", "FAR at the global threshold"),
        ):
            values = {g: v[key] for g, v in by_group.items()}
            written.append(plots.plot_group_bars(values, path(name), ylabel))
    return written


def write(report: Report, out_dir: str, label: str, **info: Any) -> dict[str, Any]:
    """Writes the report's plots, ``pairs.npz`` (pairs files), and ``metrics.json`` (its metrics
    plus ``info``, ``plots`` and ``output_dir``) into ``out_dir``; returns that record."""
    os.makedirs(out_dir, exist_ok=True)
    if report.embedded is None:
        np.savez(
            os.path.join(out_dir, "pairs.npz"),
            distances=report.distances,
            issame=report.issame,
            fold=report.fold if report.fold is not None else np.zeros(0, int),
        )
    record = {**report.metrics, **info}
    record.update(plots=write_plots(report, out_dir, label), output_dir=out_dir)
    write_json(os.path.join(out_dir, "metrics.json"), record)
    return record


def run_episodes(
    embedded,
    out_dir: str,
    way: int,
    shot: int,
    num_episodes: int,
    queries: int,
    seed: int,
    **info: Any,
) -> dict[str, Any]:
    """N-way K-shot episodes of an embedded set, written to
    ``out_dir/episodes_<way>way_<shot>shot.json`` with ``info`` and ``output_dir``."""
    e = embedded
    result = episodes(e.embeddings, e.labels, way, shot, num_episodes, queries, seed)
    result.update(num_images=len(e.labels), **info, output_dir=out_dir)
    write_json(os.path.join(out_dir, f"episodes_{way}way_{shot}shot.json"), result)
    return result


# ------------------------------------------------------------------------------ training run


def evaluate_split(embedder, dataset, config: ml_collections.ConfigDict) -> Report:
    """A training run's evaluation: ``config.eval.split`` embedded, ``Settings.of_run``."""
    embedded = embedder.embed_split(dataset, config.eval.split)
    return evaluate_set(embedded, Settings.of_run(config))


def run_record(report: Report) -> dict[str, Any]:
    """A training run's flat record of a report: verification metrics, num_images,
    num_identities."""
    return {
        **report.verification,
        **{k: report.metrics[k] for k in ("num_images", "num_identities")},
    }


def write_run(
    workdir: str, report: Report, final: dict[str, Any], baseline: dict[str, Any] | None
) -> None:
    """The end of a run: ``eval.json`` (``{"trained": final, "untrained": baseline}`` without
    its ROC), roc.png (trained and untrained curves), distances.png and embeddings.png."""
    others = {"untrained": baseline["roc"] | {"auc": baseline["auc"]}} if baseline else None
    write_plots(report, workdir, "trained", others)
    result = {"trained": final}
    if baseline is not None:
        result["untrained"] = {k: v for k, v in baseline.items() if k != "roc"}
    write_json(os.path.join(workdir, "eval.json"), result)


def run_threshold(workdir: str, network: str = "trained") -> float:
    """The verification threshold of a run's final evaluation (``WORKDIR/eval.json``) of its
    ``network``: "trained" (the final step) or "untrained" (the step-0 baseline)."""
    path = os.path.join(workdir, "eval.json")
    if not os.path.exists(path):
        raise ValueError(
            f"{path} does not exist: the run has not finished its final evaluation, so it has no "
            "threshold; pass --threshold"
        )
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); pass --threshold") from e
    if network not in record:
        why = " (config.eval.baseline was off)" if network == "untrained" else ""
        raise ValueError(
            f"{path} holds no evaluation of the {network} network{why}; pass --threshold"
        )
    try:
        return float(record[network]["threshold"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"no {network} threshold in {path} ({e}); pass --threshold") from e


def summary(final: dict[str, Any], baseline: dict[str, Any] | None, split: str) -> str:
    """The lines a run prints at its end: untrained and trained verification on ``split``."""
    lines = [f"verification on split {split!r} ({final['num_identities']} identities)"]
    for name, m in (("untrained", baseline), ("trained", final)):
        if m is None:
            continue
        lines.append(
            f"  {name:9s}: accuracy {m['accuracy']:.4f}  "
            f"10-fold {m['kfold_accuracy_mean']:.4f} +- {m['kfold_accuracy_std']:.4f}  "
            f"ROC AUC {m['auc']:.4f}  EER {m['eer']:.4f}  threshold {m['threshold']:.4f}"
        )
    return "\n".join(lines)
