"""An LFW-format, in-the-wild stand-in made from face crops: uncropped photos and ``pairs.txt``.

    python experiments/make_wild_pairs.py --root=TREE --out=DIR [--folds=10 --per_fold=300]
    facenet-jax evaluate --workdir=RUN --pairs=DIR/wild/pairs.txt --root=DIR/wild
    facenet-jax evaluate --workdir=RUN --pairs=DIR/tight/pairs.txt --root=DIR/tight

The held-out benchmark this project is measured on is LFW-like: uncropped 250x250 photos, the
face near the middle at about 40-50 % of the frame, the View-2 ``pairs.txt`` protocol, so
detection and alignment come before the network. This script builds that situation from any
tree of tight face crops ``TREE/<identity>/<image>`` (e.g. ``experiments/evaluate_all.sh``'s
``trees/bfw_test_flat``: the held-out test identities of a BFW run), twice, with the same pairs:

* ``DIR/tight/<name>/<name>_<iiii>.jpg``: the crops themselves (re-encoded as JPEG);
* ``DIR/wild/<name>/<name>_<iiii>.jpg``: each crop scaled to ``--face`` (a fraction of the
  photo's side, drawn from the range) times its size, rotated by U(-``--degrees``, ``--degrees``),
  pasted with its centre ``--shift`` (a fraction of the side) from the photo's centre, into a
  ``--size``-pixel canvas: a smooth random colour field, plus noise, and on a random half of
  the photos a second, smaller person (a crop of another identity, 22-32 % of the side, slightly
  blurred) in a corner, so the detector sees two faces and the pick has to take the subject.

and one ``pairs.txt`` (LFW View 2: a ``folds per_fold`` header, then per fold ``per_fold``
matched lines ``name i j`` and ``per_fold`` mismatched lines ``name1 i name2 j``; the identities
of different folds are disjoint, as in LFW). The difference between the two evaluations is what
detection and alignment cost on photos where the face has to be found. Nothing is downloaded; the
generated folders derive from the crops, so keep them out of the repository.
"""

from __future__ import annotations

import itertools
import os
import sys

import numpy as np
from absl import app, flags

from facenet_jax.data import files

FLAGS = flags.FLAGS
flags.DEFINE_string("root", None, "Tree of face crops, <identity>/<image>.", required=True)
flags.DEFINE_string("out", None, "Output folder (gets tight/ and wild/).", required=True)
flags.DEFINE_integer("folds", 10, "Folds (identity-disjoint).")
flags.DEFINE_integer("per_fold", 300, "Matched and mismatched pairs per fold (each).")
flags.DEFINE_integer("size", 250, "Side of the photos, pixels.")
flags.DEFINE_list("face", ["0.40", "0.55"], "Range of the face crop's height / the photo side.")
flags.DEFINE_float("degrees", 15.0, "Rotation range, degrees (uniform in +-degrees).")
flags.DEFINE_float("shift", 0.08, "Largest offset of the face centre, as a fraction of the side.")
flags.DEFINE_integer("seed", 0, "Seed of the photos and the pairs.")


def list_tree(root: str) -> dict[str, list[str]]:
    """{identity: sorted image paths} of ``root/<identity>/<image>``, identities sorted."""
    tree = {}
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        images = sorted(
            os.path.join(folder, f) for f in os.listdir(folder) if files.is_image_file(f)
        )
        if images:
            if any(c.isspace() for c in name):
                raise ValueError(f"{folder}: identity names with spaces cannot go in pairs.txt")
            tree[name] = images
    return tree


def make_pairs(
    counts: dict[str, int], folds: int, per_fold: int, rng: np.random.Generator
) -> list[list[tuple]]:
    """Per fold, ``per_fold`` matched (name, i, j) and mismatched (name1, i, name2, j) pairs,
    1-based image numbers, no pair twice; fold f uses only its own identities."""
    names = list(counts)
    order = rng.permutation(len(names))
    groups = [[names[k] for k in order[f::folds]] for f in range(folds)]
    out = []
    for fold, ids in enumerate(groups):
        matched = [(n, i, j) for n in ids for i, j in itertools.combinations(range(counts[n]), 2)]
        mismatched = [
            (a, i, b, j)
            for a, b in itertools.combinations(ids, 2)
            for i in range(counts[a])
            for j in range(counts[b])
        ]
        if len(matched) < per_fold or len(mismatched) < per_fold:
            raise ValueError(
                f"fold {fold}: {len(ids)} identities give {len(matched)} matched and "
                f"{len(mismatched)} mismatched pairs, fewer than --per_fold={per_fold}"
            )
        pick_m = rng.choice(len(matched), per_fold, replace=False)
        pick_n = rng.choice(len(mismatched), per_fold, replace=False)
        m = [(n, i + 1, j + 1) for n, i, j in (matched[k] for k in sorted(pick_m))]
        d = [(a, i + 1, b, j + 1) for a, i, b, j in (mismatched[k] for k in sorted(pick_n))]
        out.append(m + d)
    return out


def write_pairs(path: str, folds: list[list[tuple]], per_fold: int) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(f"{len(folds)}\t{per_fold}\n")
        for fold in folds:
            for pair in fold:
                f.write("\t".join(str(v) for v in pair) + "\n")
    os.replace(path + ".tmp", path)


def wild_photo(face, clutter, rng: np.random.Generator, size: int, face_range, degrees, shift):
    """A ``size`` x ``size`` RGB PIL photo with ``face`` (PIL) pasted as the module describes."""
    from PIL import Image, ImageFilter

    colours = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
    canvas = Image.fromarray(colours).resize((size, size), Image.BICUBIC)
    if clutter is not None:  # Another person in the background: smaller, in a corner.
        side = int(size * rng.uniform(0.22, 0.32))
        other = clutter.resize((side, round(side * clutter.height / clutter.width)), Image.BICUBIC)
        x, y = (int(v) for v in rng.integers(0, 2, 2) * (size - np.array(other.size)))
        canvas.paste(other.filter(ImageFilter.GaussianBlur(1)), (x, y))
    scale = rng.uniform(*face_range) * size / face.height
    face = face.resize((max(1, round(face.width * scale)), max(1, round(face.height * scale))))
    angle = rng.uniform(-degrees, degrees)
    mask = Image.new("L", face.size, 255).rotate(angle, Image.BICUBIC, expand=True)
    face = face.rotate(angle, Image.BICUBIC, expand=True)
    cx, cy = (size / 2 + rng.uniform(-shift, shift, 2) * size).tolist()
    canvas.paste(face, (round(cx - face.width / 2), round(cy - face.height / 2)), mask)
    noisy = np.asarray(canvas, np.float64) + rng.normal(0.0, 6.0, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def main(argv):
    del argv
    from PIL import Image

    rng = np.random.default_rng(FLAGS.seed)
    tree = list_tree(FLAGS.root)
    if len(tree) < 2 * FLAGS.folds:
        raise ValueError(f"--root={FLAGS.root}: {len(tree)} identities, need 2 per fold")
    folds = make_pairs({n: len(v) for n, v in tree.items()}, FLAGS.folds, FLAGS.per_fold, rng)
    face_range = tuple(float(v) for v in FLAGS.face)
    names = list(tree)
    for n, name in enumerate(names):
        for kind in ("tight", "wild"):
            os.makedirs(os.path.join(FLAGS.out, kind, name), exist_ok=True)
        for i, path in enumerate(tree[name], start=1):
            face = Image.open(path).convert("RGB")
            other = tree[names[(n + 1 + int(rng.integers(len(names) - 1))) % len(names)]]
            clutter = Image.open(other[int(rng.integers(len(other)))]).convert("RGB")
            photo = wild_photo(
                face,
                clutter if rng.random() < 0.5 else None,
                rng,
                FLAGS.size,
                face_range,
                FLAGS.degrees,
                FLAGS.shift,
            )
            for kind, image in (("tight", face), ("wild", photo)):
                image.save(os.path.join(FLAGS.out, kind, name, f"{name}_{i:04d}.jpg"), quality=95)
    for kind in ("tight", "wild"):
        write_pairs(os.path.join(FLAGS.out, kind, "pairs.txt"), folds, FLAGS.per_fold)
    total = sum(len(v) for v in tree.values())
    print(
        f"{FLAGS.out}: {len(names)} identities, {total} images as tight/ and wild/ "
        f"({FLAGS.size}x{FLAGS.size}); pairs.txt: {FLAGS.folds} folds x {FLAGS.per_fold} "
        "matched + mismatched",
        file=sys.stderr,
    )


if __name__ == "__main__":
    app.run(main)
