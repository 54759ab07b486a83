"""``facenet-jax``: embed, verify, enrol, identify and evaluate with a trained run directory.

    facenet-jax embed FOLDER --workdir RUN --out emb.npz
    facenet-jax verify IMG1 IMG2 --workdir RUN
    facenet-jax enroll FOLDER --workdir RUN --out gallery.npz [--calibrate DIR --far 1e-3]
    facenet-jax identify IMG... --workdir RUN --gallery gallery.npz
    facenet-jax evaluate --workdir RUN --pairs pairs.txt --root LFW   (or --csv pairs.csv,
                                                                      or --root DIR alone)
    facenet-jax evaluate --workdir RUN --split test   (the run's own held-out identities)
    facenet-jax episodes --workdir RUN --root DIR --way 20 --shot 1
    facenet-jax export --workdir RUN --format onnx|savedmodel|tflite|stablehlo --out PATH

(or ``python -m facenet_jax.cli ...``). Every command but ``export`` also takes ``--model PATH``,
a model written by ``export``, in place of (or next to) ``--workdir``: it then embeds with that
model, the preprocessing and threshold read from the contract ``PATH.json`` beside it.

Images go through the run's own preprocessing
(``config.data``: size, channels, crop), ``--crop`` selects another crop. A FOLDER is
``FOLDER/[<group>/]<identity>/<image>`` (``--group-depth``), a zip archive or a folder inside
one, or, for ``enroll``, ``FOLDER/<name>.<ext>`` with one photo per person. ``--json`` prints one
JSON object on stdout; ``evaluate`` and ``episodes`` also write it, with their plots, to
``--output-dir``.

``verify`` and ``enroll`` take the threshold of the network they embed with: the final one's from
``WORKDIR/eval.json``, with ``--untrained`` its untrained baseline's; another ``--step`` has none
recorded and needs ``--threshold``. A mistake (a missing folder, a bad gallery, a wrong
``--workdir``) is one line on stderr naming the argument, exit code 2; ``--verbosity 1`` shows
the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from facenet_jax import checkpoints, export, identification, inference, usage
from facenet_jax import workdir as workdir_lib
from facenet_jax.data import spec
from facenet_jax.evaluate import pairs, report, similarity_head, verification

log = logging.getLogger("facenet_jax.cli")

# Mistakes of the user or the environment: one line on stderr (usage.fail's format), exit 2;
# --verbosity=1 re-raises them with their traceback.
USER_ERRORS = (
    ValueError,  # Bad values and files (each message names the file or the flag).
    OSError,  # Missing files and folders, permissions, a full disk.
    export.MissingExtraError,
    workdir_lib.WorkdirLockedError,
    checkpoints.NonFiniteStateError,
)


# ------------------------------------------------------------------------------ helpers


def _embed_options(args) -> dict[str, Any]:
    """The ``Embedder.embed_files`` options of the command line."""
    return dict(batch_size=args.batch_size, flip=args.flip, crop=args.crop, progress=args.progress)


def _output_dir(args, name: str) -> str:
    run = args.workdir or os.path.dirname(os.path.abspath(args.model))
    return args.output_dir or os.path.join(run, "cli", name)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _warn_other_flip(args, config) -> None:
    run_flip = bool(config.eval.get("flip", False))
    if args.flip is not None and args.flip != run_flip:
        log.warning(
            "--%sflip: the run's threshold was measured %s mirror averaging (config.eval.flip="
            "%s), so it is applied to embeddings of another kind; pass --threshold to set one",
            "" if args.flip else "no-",
            "with" if run_flip else "without",
            run_flip,
        )


def _gallery_fingerprint(args, embedder) -> str:
    """What a gallery's templates are valid with: the model's fingerprint, + "+flip" when they
    are mirror-averaged (the run's config.eval.flip or --flip), so probes embedded the other way
    are refused."""
    return embedder.fingerprint + ("+flip" if embedder.resolve_flip(args.flip) else "")


def _run_threshold(args) -> float:
    """The verification threshold of the network the command embeds with: WORKDIR/eval.json's
    trained one (the final step), its untrained baseline's with --untrained, or with --model
    alone the one the export contract recorded. Any other --step has no threshold of its own:
    ValueError asking for --threshold. The threshold was measured with the run's
    ``config.eval.flip``: a --flip / --no-flip against it is warned about."""
    if args.model and not args.workdir:
        contract = export.contract.read(args.model)
        t = contract["output"].get("threshold")
        if t is None:
            raise ValueError(f"the contract of {args.model} records no threshold; pass --threshold")
        _warn_other_flip(args, export.contract.run_config(contract))
        return float(t)
    config = checkpoints.load_config(args.workdir)
    _warn_other_flip(args, config)
    if args.untrained:
        return report.run_threshold(args.workdir, "untrained")
    final = config.train.num_steps
    if args.step is not None and args.step != final:
        raise ValueError(
            f"--step {args.step}: {args.workdir}/eval.json holds the threshold of the final "
            f"network (step {final}), not of step {args.step}'s; pass --threshold (`facenet-jax "
            f"evaluate --workdir {args.workdir} --step {args.step} --split val` reports one)"
        )
    return report.run_threshold(args.workdir)


def _list_images(args, name: str, flat_ok: bool = False) -> inference.ImageSet:
    """``inference.list_images`` of the folder given as ``args.<name>``; its errors name that
    argument (``enroll``'s positional FOLDER, ``--root``, ...), not the config field."""
    flag = name.upper() if name == "folder" else f"--{name.replace('_', '-')}"
    try:
        return inference.list_images(getattr(args, name), args.group_depth, flat_ok=flat_ok)
    except (ValueError, OSError) as e:
        message = str(e)  # The library's messages name the training config's fields.
        for config_name, cli_name in (
            ("--config.data.root", flag),
            ("config.data.root", flag),
            ("config.data.group_depth", "--group-depth"),
        ):
            message = message.replace(config_name, cli_name)
        raise type(e)(
            f"{args.command} {flag}: {message}" if flag not in message else message
        ) from e


# ----------------------------------------------------------------------------- commands


def cmd_embed(args, load) -> dict:
    images = _list_images(args, "folder", flat_ok=True)
    embedder = load()
    faces = embedder.embed_set(images, **_embed_options(args))
    faces.save(args.out, embedder.fingerprint)
    return {
        "out": args.out,
        "num_images": len(faces.files),
        "num_identities": len(set(faces.names)),
        "embedding_dim": int(faces.embeddings.shape[1]),
        "fingerprint": embedder.fingerprint,
    }


def cmd_verify(args, load) -> dict:
    t = args.threshold if args.threshold is not None else _run_threshold(args)
    emb, _ = load().embed_files(None, [args.image1, args.image2], **_embed_options(args))
    d = float(verification.pair_distances(emb, np.array([0]), np.array([1]))[0])
    return {"image1": args.image1, "image2": args.image2, "distance": d, "threshold": t} | {
        "same": d <= t
    }


def cmd_enroll(args, load) -> dict:
    """Gallery threshold: calibrated for --far on --calibrate, else --threshold, else the run's."""
    images = _list_images(args, "folder", flat_ok=True)
    strangers = _list_images(args, "calibrate") if args.calibrate else None
    threshold = math.inf
    if strangers is None:
        threshold = args.threshold if args.threshold is not None else _run_threshold(args)
    embedder = load()
    people = embedder.embed_set(images, **_embed_options(args))
    gallery = identification.enrol(
        people.embeddings, people.names, _gallery_fingerprint(args, embedder), threshold
    )
    out: dict[str, Any] = {}
    if strangers is not None:
        cal = embedder.embed_set(strangers, **_embed_options(args))
        overlap = set(people.names) & set(cal.identity_names)
        if overlap:
            log.warning("%d calibration identities are also enrolled: %s", len(overlap), overlap)
        gallery, out["calibration"] = identification.calibrate_gallery(
            gallery, cal.embeddings, cal.labels, args.far, args.calibrate_for
        )
    gallery.save(args.out)
    return out | {
        "gallery": args.out,
        "num_identities": len(gallery.names),
        "num_images": len(people.files),
        "threshold": gallery.threshold,
        "target_far": _finite_or_none(gallery.target_far),
        "fingerprint": embedder.fingerprint,
    }


def cmd_identify(args, load) -> dict:
    gallery = identification.Gallery.load(args.gallery)
    embedder = load()
    gallery.check_fingerprint(_gallery_fingerprint(args, embedder), args.gallery)
    emb, _ = embedder.embed_files(None, args.images, **_embed_options(args))
    res = identification.identify(gallery, emb, args.threshold)
    found = zip(args.images, res.names, res.nearest, res.distance, res.accepted, strict=True)
    return {
        "gallery": args.gallery,
        "threshold": _finite_or_none(
            gallery.threshold if args.threshold is None else args.threshold
        ),
        "results": [
            {"image": p, "name": n, "nearest": gallery.names[k], "distance": d, "accepted": a}
            for p, n, k, d, a in found
        ],
    }


def cmd_evaluate(args, load) -> dict:
    """Verification, retrieval and open-set identification of a tree (--root), a split of the
    run's own dataset (--split), or the LFW protocol on a pairs file (--pairs/--csv)."""
    if args.split and (args.pairs or args.csv):
        raise ValueError("--split evaluates the run's own data: use it without --pairs/--csv")
    if not (args.split or args.pairs or args.csv or args.root):
        raise ValueError(
            "evaluate needs --pairs FILE --root DIR, --csv FILE, --root DIR or --split NAME"
        )
    if args.pairs and not args.root:
        raise ValueError("--pairs needs --root, the folder of ROOT/<name>/<name>_<iiii>.jpg")
    p = images = None  # Inputs are read (and checked) before the network is loaded.
    if args.pairs or args.csv:
        read = pairs.read_lfw_pairs if args.pairs else pairs.read_csv_pairs
        p = read(args.pairs or args.csv, args.root)
    elif not args.split:
        images = _list_images(args, "root")
    embedder = load()
    settings = report.Settings(
        args.num_pairs, args.folds, args.seed, args.impostors, args.far, args.shot
    )
    options = _embed_options(args)
    head = None
    if args.head_train:  # A logistic-regression pair scorer fitted on other identities.
        fit = embedder.embed_set(_list_images(args, "head_train"), **options)
        head = similarity_head.fit_similarity_head(fit.embeddings, fit.labels, seed=args.seed)
    info: dict[str, Any] = {
        "flip": embedder.resolve_flip(args.flip),
        "fingerprint": embedder.fingerprint,
    }
    if p is not None:
        emb, _ = embedder.embed_files(None, p.paths, **options)
        rep, name = report.evaluate_pairs(emb, p, settings, head), _stem(p.source)
    else:
        if args.split:
            dataset = inference.run_dataset(embedder.config, args.root)
            del options["crop"]  # The dataset crops as the run did.
            embedded, name = embedder.embed_split(dataset, args.split, **options), args.split
            info["split"] = args.split
        else:
            embedded, name = embedder.embed_set(images, **options), _stem(args.root)
        rep = report.evaluate_set(embedded, settings, head)
        info["root"] = embedded.root
    label = "untrained" if embedder.step == 0 else f"step {embedder.step}"
    return report.write(rep, _output_dir(args, f"evaluate-{name}"), label, **info)


def cmd_episodes(args, load) -> dict:
    images = _list_images(args, "root")
    embedder = load()
    embedded = embedder.embed_set(images, **_embed_options(args))
    out_dir = _output_dir(args, f"episodes-{_stem(args.root)}")
    a, info = args, {"root": args.root, "fingerprint": embedder.fingerprint}
    return report.run_episodes(
        embedded, out_dir, a.way, a.shot, a.episodes, a.queries, a.seed, **info
    )


def cmd_export(args, load) -> dict:
    """Exports the run's network (``facenet_jax.export``); returns where, and its contract's
    input and output: how to feed the model."""
    c = export.export_run(args.workdir, args.format, args.out, args.step, args.quantize)
    return {
        "format": c["format"],
        "out": args.out,
        "contract": export.contract.contract_path(args.out),
        "bytes": c["artefact_bytes"],
        "quantization": c["quantization"],
        "fingerprint": c["fingerprint"],
        "input": c["input"],
        "output": c["output"],
    }


COMMANDS: dict[str, Callable[[argparse.Namespace, Callable[[], Any]], dict]] = {
    "embed": cmd_embed,
    "verify": cmd_verify,
    "enroll": cmd_enroll,
    "identify": cmd_identify,
    "evaluate": cmd_evaluate,
    "episodes": cmd_episodes,
    "export": cmd_export,
}


# ------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workdir", default=None, help="a trained run directory")
    common.add_argument(
        "--model",
        default=None,
        help="an exported model (facenet-jax export) to embed with instead of the run's network",
    )
    common.add_argument("--step", type=int, default=None, help="checkpoint step (default: last)")
    common.add_argument("--untrained", action="store_true", help="the run's step-0 network")
    common.add_argument("--batch-size", type=int, help="default: the run's config.eval.batch_size")
    common.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add the mirror image's embedding (default: the run's config.eval.flip)",
    )
    common.add_argument("--crop", choices=spec.CROPS, help="default: the run's config.data.crop")
    common.add_argument("--group-depth", type=int, default=0, help="group folder levels (BFW: 1)")
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    common.add_argument("--no-progress", dest="progress", action="store_false")
    common.add_argument("--seed", type=int, default=0, help="seed of sampled pairs and splits")
    common.add_argument(
        "-v", "--verbosity", type=int, default=0, help="1: INFO logs, tracebacks of errors"
    )

    parser = argparse.ArgumentParser(prog="facenet-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("embed", parents=[common], help="folder -> npz of embeddings")
    p.add_argument("folder")
    p.add_argument("--out", required=True, help="output .npz (embeddings, names, paths, groups)")
    p = sub.add_parser("verify", parents=[common], help="are two images the same person?")
    p.add_argument("image1")
    p.add_argument("image2")
    p.add_argument("--threshold", type=float, help="squared distance (default: the run's)")
    p = sub.add_parser("enroll", parents=[common], help="enrol a gallery from a folder")
    p.add_argument("folder")
    p.add_argument("--out", required=True, help="gallery .npz to write")
    p.add_argument("--threshold", type=float, default=None, help="fixed rejection threshold")
    p.add_argument("--calibrate", help="folder of other people: calibrate for --far on them")
    p.add_argument("--far", type=float, default=1e-3, help="target false-accept rate")
    p.add_argument(
        "--calibrate-for",
        choices=identification.CALIBRATE_FOR,
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
    p.add_argument("--split", help="a split of the run's own dataset (test, val, train)")
    p.add_argument("--folds", type=int, default=10, help="folds when the pairs define none")
    p.add_argument("--num-pairs", type=int, default=6000, help="tree mode: pairs to sample")
    p.add_argument(
        "--impostors",
        choices=report.IMPOSTORS,
        default="group",
        help="with groups: impostors within the probe's group (BFW) or any (training's)",
    )
    p.add_argument("--far", type=float, default=1e-3, help="tree mode: open-set target FAR")
    p.add_argument("--shot", type=int, default=1, help="tree mode: open-set images enrolled")
    p.add_argument("--head-train", help="folder of other people: fit a similarity head there")
    p.add_argument("--output-dir", default=None, help="default WORKDIR/cli/evaluate-<name>")
    p = sub.add_parser("episodes", parents=[common], help="N-way K-shot episodes")
    p.add_argument("--root", required=True)
    p.add_argument("--way", type=int, default=20)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--queries", type=int, default=1, help="query images per class per episode")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--output-dir", default=None, help="default WORKDIR/cli/episodes-<name>")
    p = sub.add_parser("export", help="export the run's network with its preprocessing contract")
    p.add_argument("--workdir", required=True, help="a trained run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: last)")
    p.add_argument("--format", required=True, choices=list(export.FORMATS))
    p.add_argument(
        "--out", required=True, help="model file (a directory for savedmodel); contract: OUT.json"
    )
    p.add_argument(
        "--quantize",
        choices=export.QUANTIZATIONS,
        default="none",
        help="tflite only: float16 or dynamic-range int8 weights",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("-v", "--verbosity", type=int, default=0, help="1: tracebacks of errors")
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


def _load_embedder(args) -> inference.Embedder:
    if args.model:
        if args.untrained or args.step is not None:
            raise ValueError("--model is an exported network: --untrained / --step do not apply")
        return export.load(args.model)
    if args.untrained:
        if args.step is not None:
            raise ValueError("--untrained and --step exclude each other")
        return inference.untrained_embedder(args.workdir)
    return inference.load_embedder(args.workdir, args.step)


def _check_workdir(workdir: str) -> None:
    """Raises FileNotFoundError naming --workdir when it is not a run directory."""
    if not os.path.isdir(workdir):
        what = "is a file, not a run directory" if os.path.exists(workdir) else "does not exist"
        raise FileNotFoundError(f"--workdir {workdir} {what}")
    if not os.path.exists(checkpoints.config_path(workdir)):
        raise FileNotFoundError(
            f"--workdir {workdir} holds no run (no config.json): train one there with "
            "`python -m facenet_jax.main --workdir=...`, or point --workdir at a run directory"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; returns the exit status: 0 done, 2 a command-line or input mistake
    (one line on stderr, ``usage.error_line``; ``--verbosity=1`` raises it with its traceback)."""
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbosity >= 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    if args.command != "export" and not (args.workdir or args.model):
        message = f"facenet-jax {args.command}: --workdir or --model is required"
        print(usage.error_line(message, hint=False), file=sys.stderr)
        return usage.USAGE_ERROR
    try:
        # stdout holds the result alone (one JSON object with --json): what libraries print
        # meanwhile (tfds announces the folder it prepares) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            if args.workdir:
                _check_workdir(args.workdir)
            result = COMMANDS[args.command](args, functools.partial(_load_embedder, args))
    except USER_ERRORS as e:
        if args.verbosity >= 1:
            raise
        print(usage.error_line(f"facenet-jax {args.command}: {e}", hint=True), file=sys.stderr)
        return usage.USAGE_ERROR
    if args.json:
        print(json.dumps(report.jsonable(result), indent=2, sort_keys=True, allow_nan=False))
    else:
        _print_human(result)
    return 0


def run() -> None:
    """Console-script entry point (``facenet-jax``)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
