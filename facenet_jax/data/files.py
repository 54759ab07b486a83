"""Image files on disk: the extension list, ``ROOT/[<group>/]<identity>/<image>`` trees, reading.

A tree's ROOT is a folder, a zip archive, or a folder inside one
(``omniglot/images_background.zip/images_background``). ``scan_tree`` lists the files at identity
depth (hidden files and ``__MACOSX`` ignored) with their identity and group, plus a content
signature; ``read_file`` reads one of them. The folder source (``folder.py``) prepares a tree into
records; the CLI and evaluation list and read trees of new photos through the same functions.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import zipfile

# Extensions of the image files the CLI and evaluation pick from a folder, in the order tried when
# resolving an LFW-style name without extension. Preparing a training folder does not filter by
# extension: every file is decoded, and files that are not images are skipped with a warning.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".bmp", ".gif", ".tif", ".tiff")


def is_image_file(name: str) -> bool:
    """Whether ``name`` has one of IMAGE_EXTENSIONS (any case) and is not hidden."""
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


@dataclasses.dataclass(frozen=True)
class TreeListing:
    """The candidate image files of a tree, in sorted order, and their identities and groups."""

    root: str  # Absolute path of the folder, zip, or "archive.zip/inner/folder".
    group_depth: int
    files: tuple[str, ...]  # Paths relative to root, "/"-separated.
    identities: tuple[int, ...]  # Per file: index into identity_names.
    groups: tuple[int, ...]  # Per file: index into group_names.
    identity_names: tuple[str, ...]  # "<group>/<identity>" (or "<identity>"), sorted.
    group_names: tuple[str, ...]  # Sorted group folder names; ("all",) when group_depth == 0.
    misplaced: tuple[str, ...]  # Files not at ROOT/<group>*/<identity>/<file> depth.
    signature: str  # sha1 over the root, group_depth and every file's path, size and mtime.


def _split_zip(root: str) -> tuple[str, str] | None:
    """("path/archive.zip", "inner/prefix") when root is, or lies inside, a zip file."""
    parts = root.split(os.sep)
    for i in range(len(parts), 0, -1):
        head = os.sep.join(parts[:i]) or os.sep
        if head.lower().endswith(".zip") and os.path.isfile(head):
            return head, "/".join(p for p in parts[i:] if p)
    return None


def resolve_root(root: str) -> str:
    """Absolute path of ``config.data.root``; a relative path is tried from the working directory,
    then from the repository root (so ``../shared/data/bfw`` works from anywhere)."""
    if not root:
        raise ValueError("config.data.root is empty: set it to a folder ROOT/<identity>/<image>")
    expanded = os.path.expanduser(root)
    candidates = [os.path.abspath(expanded)]
    if not os.path.isabs(expanded):
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        candidates.append(os.path.normpath(os.path.join(repo, expanded)))
    for path in candidates:
        if os.path.isdir(path) or _split_zip(path) is not None:
            return path
    raise FileNotFoundError(
        f"config.data.root: image folder {root!r} does not exist (tried {candidates}); point "
        "--config.data.root at a folder laid out as ROOT/[<group>/]<identity>/<image>"
    )


def _walk(root: str) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file under root (a folder, zip or zip folder)."""
    zipped = _split_zip(root)
    if zipped is None:
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                    size, mtime = st.st_size, st.st_mtime_ns
                except OSError:
                    size, mtime = -1, -1  # Unreadable: inspected (and reported) later.
                rel = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
                out.append((rel, size, mtime))
        return sorted(out)
    archive, prefix = zipped
    prefix = f"{prefix}/" if prefix else ""
    with zipfile.ZipFile(archive) as zf:
        return sorted(
            (info.filename[len(prefix) :], info.file_size, info.CRC)
            for info in zf.infolist()
            if not info.is_dir() and info.filename.startswith(prefix)
        )


def scan_tree(root: str, group_depth: int = 0) -> TreeListing:
    """Lists ``ROOT/<group>*group_depth/<identity>/<file>``; raises if there is no such file."""
    if group_depth < 0:
        raise ValueError(f"config.data.group_depth must be >= 0, got {group_depth}")
    root = resolve_root(root)
    entries = _walk(root)
    depth = group_depth + 2
    files, misplaced = [], []
    for rel, _, _ in entries:
        parts = rel.split("/")
        hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
        if hidden:
            continue  # .DS_Store, ._AppleDouble and friends are not data.
        (files if len(parts) == depth else misplaced).append(rel)
    if not files:
        raise ValueError(
            f"no image files found in {root} at depth ROOT/{'<group>/' * group_depth}"
            f"<identity>/<image> ({len(misplaced)} files elsewhere); check config.data.root "
            "and config.data.group_depth"
        )
    identity_of = ["/".join(f.split("/")[:-1]) for f in files]
    group_of = ["/".join(f.split("/")[:group_depth]) or "all" for f in files]
    identity_names = sorted(set(identity_of))
    group_names = sorted(set(group_of))
    id_index = {n: i for i, n in enumerate(identity_names)}
    group_index = {n: i for i, n in enumerate(group_names)}
    h = hashlib.sha1(f"{root}\n{group_depth}\n".encode())
    for rel, size, mtime in entries:
        h.update(f"{rel}\t{size}\t{mtime}\n".encode())
    return TreeListing(
        root=root,
        group_depth=group_depth,
        files=tuple(files),
        identities=tuple(id_index[n] for n in identity_of),
        groups=tuple(group_index[n] for n in group_of),
        identity_names=tuple(identity_names),
        group_names=tuple(group_names),
        misplaced=tuple(misplaced),
        signature=h.hexdigest(),
    )


@functools.lru_cache(maxsize=4)
def _zip_handle(archive: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(archive)


def read_file(root: str, rel: str) -> bytes:
    """The bytes of ``rel`` under root (a folder or a zip); OSError when it cannot be read."""
    zipped = _split_zip(root)
    if zipped is None:
        with open(os.path.join(root, *rel.split("/")), "rb") as f:
            return f.read()
    archive, prefix = zipped
    try:
        return _zip_handle(archive).read(f"{prefix}/{rel}" if prefix else rel)
    except (KeyError, zipfile.BadZipFile) as e:
        raise OSError(str(e)) from e
