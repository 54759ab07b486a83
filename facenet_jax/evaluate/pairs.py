"""Verification pair lists: the LFW ``pairs.txt`` format, CSV pairs, and the View 2 protocol.

LFW ``pairs.txt``::

    10	300                 <- header: folds, same (and different) pairs per fold
    Abel_Pacheco	1	4      <- same person: name i j
    ...
    Abdel_Madi_Shabneh	1	Dean_Barker	1   <- different people: name1 i name2 j

Image ``i`` of ``name`` is ``ROOT/<name>/<name>_<iiii>.jpg`` (4-digit, 1-based). Each fold is a
block of ``pairs_per_fold`` same pairs followed by ``pairs_per_fold`` different pairs. Variants are
accepted: whitespace of any kind, a one-number header (``pairsDevTrain.txt``: one fold), or no
header at all (folds are then inferred from the alternating same/different blocks).

The protocol (``protocol_metrics``) reports the accuracy of each fold with the threshold tuned on
the other folds (mean +- std), plus everything ``verification.verification_metrics`` gives.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from facenet_jax.data.files import IMAGE_EXTENSIONS
from facenet_jax.evaluate import verification

_TRUE = {"1", "true", "same", "yes", "match", "genuine"}
_FALSE = {"0", "-1", "false", "different", "diff", "no", "mismatch", "impostor"}


@dataclasses.dataclass
class Pairs:
    """A list of verification pairs over a set of distinct images.

    Attributes:
      paths: the P distinct image paths (each is embedded once).
      i, j: [N] int64 indices into ``paths`` of the two images of each pair.
      issame: [N] bool.
      fold: [N] int fold id of each pair, or None when the file defines no folds.
      source: the file the pairs were read from.
    """

    paths: list[str]
    i: np.ndarray
    j: np.ndarray
    issame: np.ndarray
    fold: np.ndarray | None
    source: str

    @property
    def num_pairs(self) -> int:
        return len(self.issame)


def _index_paths(pairs: list[tuple[str, str, bool]], fold, source: str) -> Pairs:
    index: dict[str, int] = {}
    i = np.array([index.setdefault(a, len(index)) for a, _, _ in pairs], np.int64)
    j = np.array([index.setdefault(b, len(index)) for _, b, _ in pairs], np.int64)
    issame = np.array([s for _, _, s in pairs], bool)
    return Pairs(list(index), i, j, issame, fold, source)


def check_images_exist(paths: Sequence[str], source: str = "", show: int = 5) -> None:
    """Raises FileNotFoundError naming the first ``show`` missing paths and how many are missing."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        where = f" listed in {source}" if source else ""
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} images{where} are missing, e.g.:\n  "
            + "\n  ".join(missing[:show])
        )


def lfw_image_path(root: str, name: str, index: int, extensions=IMAGE_EXTENSIONS) -> str:
    """``ROOT/<name>/<name>_<iiii><ext>`` with the first extension that exists (else the first)."""
    stem = os.path.join(root, name, f"{name}_{index:04d}")
    for ext in extensions:
        if os.path.isfile(stem + ext):
            return stem + ext
    return stem + extensions[0]


def _parse_int(token: str, path: str, line_no: int, what: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise ValueError(f"{path}:{line_no}: {what} must be an integer, got {token!r}") from None


def _infer_folds(issame: np.ndarray) -> np.ndarray | None:
    """Fold ids from consecutive (same block, different block) runs; None unless >= 2 such folds."""
    if len(issame) == 0 or not issame[0]:
        return None
    starts_same = np.flatnonzero(issame & np.concatenate([[True], ~issame[:-1]]))
    if len(starts_same) < 2:
        return None
    fold = np.zeros(len(issame), np.int64)
    fold[starts_same[1:]] = 1
    return np.cumsum(fold)


def read_lfw_pairs(
    path: str,
    root: str,
    check_exists: bool = True,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> Pairs:
    """Reads an LFW-style ``pairs.txt``; images are resolved under ``root``.

    Raises:
      ValueError: a malformed line (with its line number) or a header that disagrees with the
        number of pair lines.
      FileNotFoundError: images missing (``check_exists``), listing the first few.
    """
    header: list[int] | None = None
    rows: list[tuple[str, str, bool]] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens or tokens[0].startswith("#"):
                continue
            if (
                not rows
                and header is None
                and len(tokens) <= 2
                and all(t.isdigit() for t in tokens)
            ):
                header = [int(t) for t in tokens]
                continue
            if len(tokens) == 3:
                name1 = name2 = tokens[0]
                i1 = _parse_int(tokens[1], path, line_no, "image number")
                i2 = _parse_int(tokens[2], path, line_no, "image number")
            elif len(tokens) == 4:
                name1, name2 = tokens[0], tokens[2]
                i1 = _parse_int(tokens[1], path, line_no, "image number")
                i2 = _parse_int(tokens[3], path, line_no, "image number")
            else:
                raise ValueError(
                    f"{path}:{line_no}: expected 'name i j' or 'name1 i name2 j', "
                    f"got {len(tokens)} fields: {line.strip()!r}"
                )
            rows.append(
                (
                    lfw_image_path(root, name1, i1, tuple(extensions)),
                    lfw_image_path(root, name2, i2, tuple(extensions)),
                    name1 == name2,
                )
            )
    if not rows:
        raise ValueError(f"{path}: no pairs found")
    issame = np.array([s for _, _, s in rows], bool)
    fold = _folds_from_header(header, issame, path)
    pairs = _index_paths(rows, fold, path)
    if check_exists:
        check_images_exist(pairs.paths, path)
    return pairs


def _folds_from_header(header: list[int] | None, issame: np.ndarray, path: str):
    if header is None:
        return _infer_folds(issame)
    num_folds, per_fold = (1, header[0]) if len(header) == 1 else header
    if num_folds * 2 * per_fold != len(issame):
        raise ValueError(
            f"{path}: header says {num_folds} fold(s) x {per_fold} same + {per_fold} different "
            f"pairs = {num_folds * 2 * per_fold} pairs, but the file lists {len(issame)}"
        )
    return None if num_folds < 2 else np.arange(len(issame)) // (2 * per_fold)


def _parse_label(token: str, path: str, line_no: int) -> bool:
    t = token.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(
        f"{path}:{line_no}: label must be one of {sorted(_TRUE)} (same) or {sorted(_FALSE)} "
        f"(different), got {token!r}"
    )


def read_csv_pairs(path: str, root: str | None = None, check_exists: bool = True) -> Pairs:
    """Reads a CSV of ``path1,path2,label[,fold]``, with or without that header row.

    Relative image paths are resolved against ``root`` (default: the CSV's own folder). Labels
    are 1/0, true/false or same/different; the optional fourth column is an integer fold id.
    """
    root = os.path.dirname(os.path.abspath(path)) if root is None else root
    rows: list[tuple[str, str, bool]] = []
    folds: list[int] = []
    columns = (0, 1, 2, 3)
    first = True
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        for rec in reader:
            line_no = reader.line_num
            rec = [c.strip() for c in rec]
            if not any(rec) or rec[0].startswith("#"):
                continue
            is_header = first and len(rec) >= 3 and rec[2].lower() not in _TRUE | _FALSE
            first = False
            if is_header:
                names = [c.lower() for c in rec]
                missing = [c for c in ("path1", "path2", "label") if c not in names]
                if missing:
                    raise ValueError(f"{path}:{line_no}: header lacks column(s) {missing}")
                fold_col = names.index("fold") if "fold" in names else 3
                columns = (*(names.index(c) for c in ("path1", "path2", "label")), fold_col)
                continue
            if len(rec) < 3:
                raise ValueError(
                    f"{path}:{line_no}: expected path1,path2,label[,fold], got {len(rec)} field(s)"
                )
            a, b = (os.path.join(root, rec[columns[k]]) for k in (0, 1))
            rows.append((a, b, _parse_label(rec[columns[2]], path, line_no)))
            if len(rec) > columns[3] and rec[columns[3]]:
                folds.append(_parse_int(rec[columns[3]], path, line_no, "fold"))
    if not rows:
        raise ValueError(f"{path}: no pairs found")
    if folds and len(folds) != len(rows):
        raise ValueError(f"{path}: {len(folds)} of {len(rows)} rows give a fold; give all or none")
    fold = np.array(folds, np.int64) if folds and len(set(folds)) >= 2 else None
    pairs = _index_paths(rows, fold, path)
    if check_exists:
        check_images_exist(pairs.paths, path)
    return pairs


def read_pairs(path: str, root: str | None = None, check_exists: bool = True) -> Pairs:
    """``read_csv_pairs`` for ``*.csv``, ``read_lfw_pairs`` otherwise (``root`` required)."""
    if path.lower().endswith(".csv"):
        return read_csv_pairs(path, root, check_exists)
    if root is None:
        raise ValueError(f"{path}: LFW-style pairs need the image root (ROOT/<name>/...)")
    return read_lfw_pairs(path, root, check_exists)


def protocol_metrics(
    distances: np.ndarray,
    issame: np.ndarray,
    fold: np.ndarray | None = None,
    num_folds: int = 10,
    seed: int = 0,
) -> dict:
    """The LFW View 2 protocol on pair distances.

    Args:
      distances: [N] distances of the pairs (lower = same); issame: [N] bool.
      fold: [N] fold id of each pair from the file; each fold's accuracy uses the threshold tuned
        on all the other folds. When None, a shuffled ``num_folds``-fold KFold (``seed``) is used.

    Returns:
      ``verification.verification_metrics`` (its kfold_* entries computed on these folds) plus
      ``fold_accuracies`` and ``fold_thresholds`` (lists) and ``num_folds``.
    """
    d = np.asarray(distances, np.float64)
    if fold is not None:
        splits = verification.fold_id_splits(fold)
    else:
        splits = verification.kfold_splits(len(d), num_folds, seed)
    out = verification.verification_metrics(d, issame, splits=splits)
    accs, thresholds = verification.fold_accuracies(d, np.asarray(issame, bool), splits)
    out.update(
        fold_accuracies=[float(a) for a in accs],
        fold_thresholds=[float(t) for t in thresholds],
        num_folds=len(splits),
    )
    return out
