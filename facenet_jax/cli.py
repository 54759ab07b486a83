"""``facenet-jax``: embed, verify, enrol, identify and evaluate with a trained run directory.

    facenet-jax embed FOLDER --workdir RUN --out emb.npz
    facenet-jax verify IMG1 IMG2 --workdir RUN
    facenet-jax enroll FOLDER --workdir RUN --out gallery.npz [--calibrate DIR --far 1e-3]
    facenet-jax identify IMG... --workdir RUN --gallery gallery.npz
    facenet-jax evaluate --workdir RUN --pairs pairs.txt --root LFW   (or --csv pairs.csv,
                                                                      or --root DIR alone)
    facenet-jax evaluate --workdir RUN --split test   (the run's own held-out identities)
    facenet-jax episodes --workdir RUN --root DIR --way 20 --shot 1

(or ``python -m facenet_jax.cli ...``). Images go through the run's own preprocessing
(``config.data``: size, channels, crop), ``--crop`` selects another crop. A FOLDER is
``FOLDER/[<group>/]<identity>/<image>`` (``--group-depth``), a zip archive or a folder inside
one, or, for ``enroll``, ``FOLDER/<name>.<ext>`` with one photo per person. ``--json`` prints one
JSON object on stdout; ``evaluate`` and ``episodes`` also write it, with their plots, to
``--output-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from facenet_jax import identification
from facenet_jax.data import sampling
from facenet_jax.evaluate import pairs, plots, retrieval, verification

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".bmp", ".gif", ".tif", ".tiff")
log = logging.getLogger("facenet_jax.cli")


# ------------------------------------------------------------------------------ images


@dataclasses.dataclass
class ImageSet:
    """Images of a folder tree: ``files[k]`` under ``root`` (None: absolute paths)."""

    root: str | None
    files: list[str]
    labels: np.ndarray  # [N] index into identity_names
    identity_names: list[str]
    groups: np.ndarray  # [N] index into group_names
    group_names: list[str]


def list_images(root: str, group_depth: int = 0, flat_ok: bool = False) -> ImageSet:
    """The image files of ``ROOT/[<group>/]<identity>/<image>`` (folder or zip).

    With ``flat_ok`` a folder of ``ROOT/<name>.<ext>`` files (one photo per person) is accepted
    when it has no identity sub-folders.
    """
    from facenet_jax.data import folder_builder

    try:
        tree = folder_builder.scan_tree(root, group_depth)
        keep = [k for k, f in enumerate(tree.files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not keep:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        return ImageSet(
            tree.root,
            [tree.files[k] for k in keep],
            np.asarray(tree.identities)[keep],
            list(tree.identity_names),
            np.asarray(tree.groups)[keep],
            list(tree.group_names),
        )
    except ValueError:
        flat = sorted(
            f
            for f in (os.listdir(root) if flat_ok and os.path.isdir(root) else [])
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        )
        if not flat:
            raise
        names = [os.path.splitext(f)[0] for f in flat]
        return ImageSet(
            os.path.abspath(root),
            flat,
            np.arange(len(flat)),
            names,
            np.zeros(len(flat), int),
            ["all"],
        )


def load_file(root: str | None, rel: str, data_config: Any) -> np.ndarray:
    """One image as training sees it, [S, S, C] float32 in [-1, 1]; ValueError if undecodable.

    ``rel`` lies under ``root``, a folder or a zip archive (None: ``rel`` is a path). Files go
    through ``preprocessing.load_image``; zip members through ``preprocess_image`` on their bytes.
    """
    from facenet_jax.data import face_detection, folder_builder, preprocessing

    if root is None or os.path.isdir(root):
        return preprocessing.load_image(
            rel if root is None else os.path.join(root, rel), data_config
        )
    name = f"{root}/{rel}"
    data = folder_builder.read_file(root, rel)
    if not data:
        raise ValueError(f"image file {name} is empty (0 bytes)")
    try:
        face_box = None
        if data_config.get("crop", "none") == "detect":
            rgb = np.asarray(preprocessing.to_mode(preprocessing.open_image(data), 3))
            face_box = face_detection.detect_relative(rgb, data_config.get("detector", "mtcnn"))
            if face_box is None:
                log.warning("crop=detect: no face found in %s; using the center crop", name)
        return preprocessing.preprocess_image(data, data_config, face_box)
    except preprocessing.DECODE_ERRORS as e:
        raise ValueError(f"cannot decode image file {name}: {e}") from e


def _embed_padded(embedder, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Embeds x [n <= batch_size, ...] padded to a power of two, so few shapes are compiled."""
    n = len(x)
    b = min(batch_size, max(8, 1 << (n - 1).bit_length()))
    if b > n:
        x = np.concatenate([x, np.zeros((b - n, *x.shape[1:]), x.dtype)])
    return np.asarray(embedder.embed(x, max(batch_size, b)))[:n]


def _embed_batch(embedder, x: np.ndarray, batch_size: int, flip: bool) -> np.ndarray:
    """[n, d] float32 embeddings of a preprocessed batch; with ``flip``, of image + mirror."""
    emb = _embed_padded(embedder, x, batch_size)
    if flip:
        mirror = _embed_padded(embedder, np.ascontiguousarray(x[:, :, ::-1]), batch_size)
        emb = identification.l2_normalize(emb + mirror)
    return np.asarray(emb, np.float32)


def embed_files(
    embedder,
    root: str | None,
    files: Sequence[str],
    batch_size: int = 256,
    flip: bool = False,
    progress: bool = True,
    skip_bad: bool = False,
    data_config: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeds image files (under ``root``, or absolute paths when root is None).

    With ``flip`` the embedding is that of the image plus its mirror image, re-normalised.
    Undecodable files raise, or with ``skip_bad`` are skipped with a warning naming each.
    ``data_config`` (default: the run's ``config.data``) sets size, channels and crop.

    Returns:
      ``(embeddings [n_ok, d] float32, ok [N] bool)``.
    """
    from tqdm.auto import tqdm

    data_config = embedder.config.data if data_config is None else data_config
    ok = np.ones(len(files), bool)
    out = []
    bar = tqdm(total=len(files), desc="embed", unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(files), batch_size):
        images = []
        for k in range(start, min(start + batch_size, len(files))):
            try:
                images.append(load_file(root, files[k], data_config))
            except (OSError, ValueError) as e:
                if not skip_bad:
                    raise
                ok[k] = False
                log.warning("skipping %s", e)
        bar.update(min(batch_size, len(files) - start))
        if not images:
            continue
        out.append(_embed_batch(embedder, np.stack(images), batch_size, flip))
    bar.close()
    if (~ok).any():
        log.warning("skipped %d of %d files that could not be read", int((~ok).sum()), len(files))
    dim = embedder.config.model.embedding_dim
    return (np.concatenate(out) if out else np.zeros((0, dim), np.float32)), ok


def _embed(args, embedder, root: str | None, files: Sequence[str], skip_bad: bool = False):
    """``embed_files`` with the command line's batch size, flip, progress and crop."""
    data_config = embedder.config.data
    if args.crop is not None and args.crop != data_config.crop:
        log.warning("crop=%s differs from the run's crop=%s", args.crop, data_config.crop)
        data_config = ml_collections.ConfigDict(data_config.to_dict())
        data_config.crop = args.crop
    return embed_files(
        embedder, root, files, args.batch_size, args.flip, args.progress, skip_bad, data_config
    )


def _embed_set(embedder, images: ImageSet, args) -> tuple[np.ndarray, ImageSet]:
    emb, ok = _embed(args, embedder, images.root, images.files, skip_bad=True)
    kept = ImageSet(
        images.root,
        [f for f, k in zip(images.files, ok, strict=True) if k],
        images.labels[ok],
        images.identity_names,
        images.groups[ok],
        images.group_names,
    )
    return emb, kept


# ------------------------------------------------------------------------------ helpers


def jsonable(obj: Any) -> Any:
    """Replaces NaN and infinities by None (strict JSON) and NumPy scalars by Python ones."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(jsonable(obj), f, indent=2, sort_keys=True, allow_nan=False)
    os.replace(tmp, path)


def _trained_threshold(workdir: str) -> float:
    """The verification threshold of the run's final evaluation (WORKDIR/eval.json)."""
    path = os.path.join(workdir, "eval.json")
    try:
        with open(path) as f:
            return float(json.load(f)["trained"]["threshold"])
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"no threshold in {path} ({e}); pass --threshold") from e


def _output_dir(args, name: str) -> str:
    return args.output_dir or os.path.join(args.workdir, "cli", name)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


# ----------------------------------------------------------------------------- commands


def cmd_embed(args, load) -> dict:
    images = list_images(args.folder, args.group_depth, flat_ok=True)
    embedder = load()
    emb, images = _embed_set(embedder, images, args)
    names = [images.identity_names[k] for k in images.labels]
    np.savez(
        args.out,
        embeddings=emb,
        names=np.asarray(names, dtype=str),
        paths=np.asarray(images.files, dtype=str),
        groups=np.asarray([images.group_names[g] for g in images.groups], dtype=str),
        fingerprint=np.asarray(embedder.fingerprint),
    )
    return {
        "out": args.out,
        "num_images": len(images.files),
        "num_identities": len(set(names)),
        "embedding_dim": int(emb.shape[1]),
        "fingerprint": embedder.fingerprint,
    }


def cmd_verify(args, load) -> dict:
    t = args.threshold if args.threshold is not None else _trained_threshold(args.workdir)
    emb, _ = _embed(args, load(), None, [args.image1, args.image2])
    d = float(np.sum((emb[0].astype(np.float64) - emb[1]) ** 2))
    return {
        "image1": args.image1,
        "image2": args.image2,
        "distance": d,
        "threshold": t,
        "same": bool(d <= t),
    }


def cmd_enroll(args, load) -> dict:
    """Gallery threshold: calibrated for --far on --calibrate, else --threshold, else the run's."""
    images = list_images(args.folder, args.group_depth, flat_ok=True)
    cal_set = list_images(args.calibrate, args.group_depth) if args.calibrate else None
    threshold, target_far = math.nan, math.nan
    if cal_set is None:
        threshold = (
            args.threshold if args.threshold is not None else _trained_threshold(args.workdir)
        )
    embedder = load()
    emb, images = _embed_set(embedder, images, args)
    names = [images.identity_names[k] for k in images.labels]
    out: dict[str, Any] = {}
    gallery = identification.enrol(emb, names, embedder.fingerprint, threshold, target_far)
    if cal_set is not None:
        cal_emb, cal_set = _embed_set(embedder, cal_set, args)
        overlap = set(names) & set(cal_set.identity_names)
        if overlap:
            log.warning("%d calibration identities are also enrolled: %s", len(overlap), overlap)
        if args.calibrate_for == "gallery":  # FPIR: strangers' nearest template, this gallery
            out["calibration"] = identification.calibrate_fpir(gallery, cal_emb, args.far)
        else:  # per-comparison FAR over the calibration set's own impostor pairs
            out["calibration"] = identification.calibrate_threshold(
                cal_emb, cal_set.labels, args.far
            )
        threshold, target_far = out["calibration"]["threshold"], args.far
        gallery.threshold, gallery.target_far = threshold, target_far
    gallery.save(args.out)
    out.update(
        gallery=args.out,
        num_identities=len(gallery.names),
        num_images=len(names),
        threshold=threshold,
        target_far=target_far,
        fingerprint=embedder.fingerprint,
    )
    return out


def cmd_identify(args, load) -> dict:
    gallery = identification.Gallery.load(args.gallery)
    embedder = load()
    gallery.check_fingerprint(embedder.fingerprint)
    emb, _ = _embed(args, embedder, None, args.images)
    res = identification.identify(gallery, emb, args.threshold)
    return {
        "gallery": args.gallery,
        "threshold": float(gallery.threshold if args.threshold is None else args.threshold),
        "results": [
            {
                "image": p,
                "name": n,
                "nearest": gallery.names[k],
                "distance": float(d),
                "accepted": bool(a),
            }
            for p, n, k, d, a in zip(
                args.images, res.names, res.nearest, res.distance, res.accepted, strict=True
            )
        ],
    }


def _verification_plots(out_dir: str, dist, issame, metrics: dict) -> list[str]:
    far, tar, _ = verification.roc_curve(dist, issame)
    auc, threshold = metrics["auc"], metrics["threshold"]
    return [
        plots.plot_roc({f"AUC {auc:.4f}": (far, tar)}, os.path.join(out_dir, "roc.png")),
        plots.plot_distance_histograms(
            dist, issame, threshold, os.path.join(out_dir, "distances.png")
        ),
    ]


def cmd_evaluate(args, load) -> dict:
    if args.split and (args.pairs or args.csv):
        raise ValueError("--split evaluates the run's own data: use it without --pairs/--csv")
    if args.split:
        return _evaluate_split(args, load)
    if args.pairs or args.csv:
        return _evaluate_pairs(args, load)
    if not args.root:
        raise ValueError(
            "evaluate needs --pairs FILE --root DIR, --csv FILE, --root DIR or --split NAME"
        )
    return _evaluate_folder(args, load)


def _evaluate_split(args, load) -> dict:
    """The folder protocol on a split of the run's own dataset (``config.data``, e.g. the unseen
    test identities); ``--root`` points the run's folder source elsewhere if the data moved."""
    from tqdm.auto import tqdm

    from facenet_jax.data import input_pipeline

    embedder = load()
    config = embedder.config.copy_and_resolve_references()
    if args.root:
        config.data.root = args.root
    dataset = input_pipeline.create_dataset(config)
    info = dataset.split_info(args.split)  # Unknown split names fail here, naming the valid ones.
    embs, labels, groups = [], [], []
    total = info["num_images"]
    bar = tqdm(total=total, desc=f"embed {args.split}", disable=not args.progress, file=sys.stderr)
    for batch in dataset.eval_batches(args.split, args.batch_size):
        keep = batch["label"] != sampling.IGNORE_LABEL
        x = np.asarray(batch["image"], np.float32)
        embs.append(_embed_batch(embedder, x, args.batch_size, args.flip)[keep])
        labels.append(batch["label"][keep])
        groups.append(batch["group"][keep])
        bar.update(int(keep.sum()))
    bar.close()
    images = ImageSet(
        root=f"{config.data.source}:{args.split}",
        files=[f"{args.split}/{k}" for k in range(sum(len(x) for x in labels))],
        labels=np.concatenate(labels),
        identity_names=list(info["identity_names"]),
        groups=np.concatenate(groups),
        group_names=list(info["group_names"]),
    )
    result = _evaluate_embedded(args, embedder, np.concatenate(embs), images, args.split)
    result["split"] = args.split
    return result


def _evaluate_pairs(args, load) -> dict:
    if args.pairs:
        if not args.root:
            raise ValueError("--pairs needs --root, the folder of ROOT/<name>/<name>_<iiii>.jpg")
        p = pairs.read_lfw_pairs(args.pairs, args.root)
    else:
        p = pairs.read_csv_pairs(args.csv, args.root)
    embedder = load()
    emb, _ = _embed(args, embedder, None, p.paths)
    dist = verification.pair_distances(emb, p.i, p.j)
    result = pairs.protocol_metrics(dist, p.issame, p.fold, args.folds, args.seed)
    if args.head_train:
        scores = _head_scores(args, embedder, emb, p.i, p.j)
        result["similarity_head"] = pairs.protocol_metrics(
            scores, p.issame, p.fold, args.folds, args.seed
        )
    out_dir = _output_dir(args, f"evaluate-{_stem(p.source)}")
    np.savez(
        os.path.join(_mkdir(out_dir), "pairs.npz"),
        distances=dist,
        issame=p.issame,
        fold=p.fold if p.fold is not None else np.zeros(0, int),
    )
    result["plots"] = _verification_plots(out_dir, dist, p.issame, result)
    result.update(
        pairs_file=p.source,
        num_images=len(p.paths),
        flip=args.flip,
        fingerprint=embedder.fingerprint,
        output_dir=out_dir,
    )
    _write_json(os.path.join(out_dir, "metrics.json"), result)
    return result


def _head_scores(args, embedder, emb: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Fits the similarity head on --head-train's identities; its scores (lower = same)."""
    from facenet_jax.evaluate import similarity_head

    train_set = list_images(args.head_train, args.group_depth)
    train_emb, train_set = _embed_set(embedder, train_set, args)
    head = similarity_head.fit_similarity_head(train_emb, train_set.labels, seed=args.seed)
    return similarity_head.head_distances(head, emb[i], emb[j])


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def _evaluate_folder(args, load) -> dict:
    """Sampled pairs, per-group verification, retrieval and open-set identification on a tree."""
    images = list_images(args.root, args.group_depth)
    embedder = load()
    emb, images = _embed_set(embedder, images, args)
    return _evaluate_embedded(args, embedder, emb, images, _stem(args.root))


def _evaluate_embedded(args, embedder, emb: np.ndarray, images: ImageSet, name: str) -> dict:
    """Verification, retrieval, open-set identification and plots of embedded labelled images."""
    # With groups, impostor pairs stay within a group (the BFW protocol): a group's FAR then
    # measures confusions between its own members, not with easier, other-group faces.
    grouped = len(images.group_names) > 1
    within = grouped and args.impostors == "group"
    groups = images.groups if within else None
    i, j, issame = verification.sample_pairs(images.labels, args.num_pairs, args.seed, groups)
    dist = verification.pair_distances(emb, i, j)
    result: dict[str, Any] = {
        "verification": verification.verification_metrics(dist, issame, args.folds, args.seed),
        "retrieval": retrieval.retrieval_metrics(emb, images.labels),
        "open_set": identification.open_set_protocol(
            emb, images.labels, target_far=args.far, shots=args.shot, seed=args.seed
        ),
    }
    if args.head_train:
        scores = _head_scores(args, embedder, emb, i, j)
        result["similarity_head"] = verification.verification_metrics(
            scores, issame, args.folds, args.seed
        )
    out_dir = _mkdir(_output_dir(args, f"evaluate-{name}"))
    figs = _verification_plots(out_dir, dist, issame, result["verification"])
    figs.append(
        plots.plot_embeddings_2d(
            emb,
            np.asarray(images.identity_names)[images.labels],
            os.path.join(out_dir, "embeddings.png"),
        )
    )
    if grouped:
        by_group = verification.group_metrics(
            dist, issame, verification.pair_groups(images.groups, i, j), images.group_names
        )
        result["groups"] = by_group
        g = by_group["groups"]
        figs.append(
            plots.plot_group_bars(
                {k: v["accuracy"] for k, v in g.items()},
                os.path.join(out_dir, "group_accuracy.png"),
                "accuracy",
            )
        )
        figs.append(
            plots.plot_group_bars(
                {k: v["far_at_global_threshold"] for k, v in g.items()},
                os.path.join(out_dir, "group_far.png"),
                "FAR at the global threshold",
            )
        )
    result.update(
        plots=figs,
        root=images.root,
        negative_pairs="within group" if within else "any identity",
        num_images=len(images.files),
        num_identities=int(len(np.unique(images.labels))),
        flip=args.flip,
        fingerprint=embedder.fingerprint,
        output_dir=out_dir,
    )
    _write_json(os.path.join(out_dir, "metrics.json"), result)
    return result


def cmd_episodes(args, load) -> dict:
    images = list_images(args.root, args.group_depth)
    embedder = load()
    emb, images = _embed_set(embedder, images, args)
    result = identification.episodes(
        emb, images.labels, args.way, args.shot, args.episodes, args.queries, args.seed
    )
    out_dir = _mkdir(_output_dir(args, f"episodes-{_stem(args.root)}"))
    result.update(
        root=args.root,
        num_images=len(images.files),
        fingerprint=embedder.fingerprint,
        output_dir=out_dir,
    )
    _write_json(os.path.join(out_dir, f"episodes_{args.way}way_{args.shot}shot.json"), result)
    return result


COMMANDS: dict[str, Callable[[argparse.Namespace, Callable[[], Any]], dict]] = {
    "embed": cmd_embed,
    "verify": cmd_verify,
    "enroll": cmd_enroll,
    "identify": cmd_identify,
    "evaluate": cmd_evaluate,
    "episodes": cmd_episodes,
}


# ------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workdir", required=True, help="a trained run directory")
    common.add_argument("--step", type=int, default=None, help="checkpoint step (default: last)")
    common.add_argument(
        "--untrained",
        action="store_true",
        help="use the run's network at initialisation (its untrained baseline) instead",
    )
    common.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    common.add_argument("--flip", action="store_true", help="add the mirror image's embedding")
    common.add_argument(
        "--crop",
        choices=("none", "center", "detect"),
        default=None,
        help="face crop (default: the run's config.data.crop)",
    )
    common.add_argument(
        "--group-depth",
        type=int,
        default=0,
        help="levels of group folders above the identity folders (BFW: 1)",
    )
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    common.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars"
    )
    common.add_argument("--seed", type=int, default=0, help="seed of sampled pairs and splits")

    parser = argparse.ArgumentParser(prog="facenet-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("embed", parents=[common], help="folder -> npz of embeddings")
    p.add_argument("folder")
    p.add_argument("--out", required=True, help="output .npz (embeddings, names, paths, groups)")
    p = sub.add_parser("verify", parents=[common], help="are two images the same person?")
    p.add_argument("image1")
    p.add_argument("image2")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="squared-distance threshold (default: the run's eval.json)",
    )
    p = sub.add_parser("enroll", parents=[common], help="enrol a gallery from a folder")
    p.add_argument("folder")
    p.add_argument("--out", required=True, help="gallery .npz to write")
    p.add_argument("--threshold", type=float, default=None, help="fixed rejection threshold")
    p.add_argument(
        "--calibrate",
        default=None,
        help="labelled folder of other identities: calibrate the threshold for --far",
    )
    p.add_argument("--far", type=float, default=1e-3, help="target false-accept rate")
    p.add_argument(
        "--calibrate-for",
        choices=("comparison", "gallery"),
        default="comparison",
        help="comparison: --far per impostor comparison; gallery: --far of strangers accepted "
        "by this gallery (FPIR: their nearest template within the threshold)",
    )
    p = sub.add_parser("identify", parents=[common], help="identify images against a gallery")
    p.add_argument("images", nargs="+")
    p.add_argument("--gallery", required=True)
    p.add_argument("--threshold", type=float, default=None, help="override the gallery's")
    p = sub.add_parser("evaluate", parents=[common], help="verification protocol")
    p.add_argument("--pairs", default=None, help="LFW-format pairs.txt")
    p.add_argument("--csv", default=None, help="CSV of path1,path2,label[,fold]")
    p.add_argument("--root", default=None, help="image root (alone: evaluate the whole tree)")
    p.add_argument(
        "--split",
        default=None,
        help="evaluate a split of the run's own dataset (test: its unseen identities; val; train)",
    )
    p.add_argument("--folds", type=int, default=10, help="folds when the pairs define none")
    p.add_argument("--num-pairs", type=int, default=6000, help="tree mode: pairs to sample")
    p.add_argument(
        "--impostors",
        choices=("group", "any"),
        default="group",
        help="tree/split mode with groups: impostor pairs within the probe's group (BFW "
        "protocol) or from any identity (what training's own evaluation uses)",
    )
    p.add_argument("--far", type=float, default=1e-3, help="tree mode: open-set target FAR")
    p.add_argument("--shot", type=int, default=1, help="tree mode: open-set images enrolled")
    p.add_argument(
        "--head-train",
        default=None,
        help="folder of other (training) identities: also score the pairs with a logistic-"
        "regression similarity head fitted there",
    )
    p.add_argument("--output-dir", default=None, help="default WORKDIR/cli/evaluate-<name>")
    p = sub.add_parser("episodes", parents=[common], help="N-way K-shot episodes")
    p.add_argument("--root", required=True)
    p.add_argument("--way", type=int, default=20)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--queries", type=int, default=1, help="query images per class per episode")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--output-dir", default=None, help="default WORKDIR/cli/episodes-<name>")
    return parser


def _print_human(result: dict, indent: str = "") -> None:
    for k, v in result.items():
        if isinstance(v, dict):
            print(f"{indent}{k}:")
            _print_human(v, indent + "  ")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            print(f"{indent}{k}:")
            for item in v:
                print(f"{indent}  " + "  ".join(f"{a}={b}" for a, b in item.items()))
        elif isinstance(v, float):
            print(f"{indent}{k}: {v:.6g}")
        else:
            print(f"{indent}{k}: {v}")


def _load_embedder(args):
    from facenet_jax import inference  # Deferred: JAX starts only once the inputs are valid.

    if args.untrained:
        if args.step is not None:
            raise ValueError("--untrained and --step exclude each other")
        return inference.untrained_embedder(args.workdir)
    return inference.load_embedder(args.workdir, args.step)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; returns the exit status (2 with a one-line message on bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        result = COMMANDS[args.command](args, functools.partial(_load_embedder, args))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"facenet-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(jsonable(result), indent=2, sort_keys=True, allow_nan=False))
    else:
        _print_human(result)
    return 0


def run() -> None:
    """Console-script entry point (``facenet-jax``)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
