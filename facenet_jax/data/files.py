"""Image files on disk: the extension list, ``ROOT/[<group>/]<identity>/<image>`` trees, reading.

A tree's ROOT is a folder, a zip archive, or a folder inside one
(``omniglot/images_background.zip/images_background``). ``scan_tree`` lists the files at identity
depth (hidden files and ``__MACOSX`` ignored) with their identity and group, plus a content
signature; ``read_file`` reads one of them. The folder source (``folder.py``) prepares a tree into
records; the CLI and evaluation list and read trees of new photos through the same functions.

What a folder may hold besides images, and what the listing does with it:

* named pipes, sockets and devices: skipped (never opened: reading a pipe blocks forever), each
  named in ``TreeListing.skipped`` with its kind; ``read_file`` refuses them too;
* names that are not valid UTF-8 (Latin-1 archives): skipped, named with the bad bytes escaped
  (``caf\\xe9.jpg``); tfds stores paths as UTF-8 text, and a name that cannot be written cannot be
  traced back to its file;
* symbolic links to folders: followed. Each real folder is listed once: a link to a folder that is
  already listed (a loop, or an alias of an identity inside the tree) is skipped, naming the folder
  it duplicates, so one person never becomes two identities split across train and test. Real
  folders win over links, whatever the names' order;
* unreadable folders: skipped and named; identity folders without a file: counted
  (``TreeListing.empty_identities``).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import os
import stat
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
    # (path, reason) of what is never read: not a regular file, a name that is not UTF-8 (path
    # escaped by ``display_name``), a link to a folder listed already, an unreadable folder.
    skipped: tuple[tuple[str, str], ...] = ()
    empty_identities: tuple[str, ...] = ()  # Identity-depth folders holding no candidate file.


def _split_zip(root: str) -> tuple[str, str] | None:
    """("path/archive.zip", "inner/prefix") when root is, or lies inside, a zip file."""
    parts = root.split(os.sep)
    for i in range(len(parts), 0, -1):
        head = os.sep.join(parts[:i]) or os.sep
        if head.lower().endswith(".zip") and os.path.isfile(head):
            return head, "/".join(p for p in parts[i:] if p)
    return None


def display_name(name: str) -> str:
    """``name`` with the bytes that are not UTF-8 escaped (``caf\\xe9.jpg``); other names as is.

    Python hands undecodable file-name bytes over as lone surrogates, which cannot be encoded
    (logged, hashed or stored); this is the printable, encodable form naming such a file.
    """
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def resolve_root(root: str) -> str:
    """Absolute path of ``config.data.root``; a relative path is tried from the working directory,
    then from the repository root (so ``../shared/data/bfw`` works from anywhere).

    A folder, a ``.zip`` file or a path inside one is a root; a path naming another kind of file
    raises ValueError saying so, a missing path FileNotFoundError."""
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
    for path in candidates:
        if os.path.exists(path):
            raise ValueError(
                f"config.data.root: {display_name(path)!r} is a {_kind(os.stat(path).st_mode)}, "
                "not a folder or a .zip archive; point --config.data.root at a folder laid out as "
                "ROOT/[<group>/]<identity>/<image> (or a .zip of one)"
            )
    raise FileNotFoundError(
        f"config.data.root: image folder {root!r} does not exist (tried {candidates}); point "
        "--config.data.root at a folder laid out as ROOT/[<group>/]<identity>/<image>"
    )


_KINDS = {
    stat.S_IFIFO: "named pipe",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFDIR: "folder",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symbolic link",
}


def _kind(mode: int) -> str:
    """What a stat mode is, in words ("named pipe", "socket", ...)."""
    return _KINDS.get(stat.S_IFMT(mode), "special file")


@dataclasses.dataclass
class _Walk:
    """Everything under a root: non-folder entries and the folders, paths "/"-separated."""

    entries: list[tuple[str, int, int, str]]  # (path, size, mtime_ns, skip reason or "").
    folders: list[str]  # Folders listed (readable, not duplicates), "" being the root.


def _walk_folder(root: str) -> _Walk:
    """Lists a folder tree, following links to folders once (see the module docstring).

    Real folders are walked first, links to folders afterwards (breadth of links by depth), and a
    folder (device, inode) already walked is never walked again: loops end, and an alias of a real
    folder names the real one.
    """
    walk = _Walk([], [])
    seen: dict[tuple[int, int], str] = {}
    pending = [("", root)]  # Links to folders, walked after the real tree.
    while pending:
        linked, pending = pending, []
        for rel_dir, path in linked:
            _walk_real(rel_dir, path, walk, seen, pending)
    return walk


def _walk_real(
    rel_dir: str,
    path: str,
    walk: _Walk,
    seen: dict[tuple[int, int], str],
    pending: list[tuple[str, str]],
) -> None:
    """Walks the real (unlinked) folders under ``path`` (listed as ``rel_dir``) into ``walk``.

    ``seen`` maps the (device, inode) of every folder walked to its path; links to folders found
    go to ``pending``, walked in the next round.
    """
    label = rel_dir + "/" if rel_dir else "."
    try:
        st = os.stat(path)
    except OSError as e:
        walk.entries.append((label, -1, -1, f"unreadable folder ({e.strerror or e})"))
        return
    key = (st.st_dev, st.st_ino)
    if key in seen:
        first = seen[key] + "/" if seen[key] else "ROOT"
        walk.entries.append((label, -1, -1, f"a link to {first}, which is listed already"))
        return
    seen[key] = rel_dir
    stack = [(rel_dir, path)]
    while stack:
        rel_dir, path = stack.pop()
        try:
            with os.scandir(path) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as e:
            walk.entries.append((rel_dir + "/", -1, -1, f"unreadable folder ({e.strerror or e})"))
            continue
        walk.folders.append(rel_dir)
        sub = []
        for child in children:
            rel = display_name(f"{rel_dir}/{child.name}" if rel_dir else child.name)
            undecodable = rel != (f"{rel_dir}/{child.name}" if rel_dir else child.name)
            try:
                is_link = child.is_symlink()
                is_dir = child.is_dir(follow_symlinks=False)
            except OSError:
                is_link = is_dir = False
            if is_dir or (is_link and os.path.isdir(child.path)):
                if undecodable:
                    _skip_tree(child.path, rel, walk)
                elif is_link:
                    pending.append((rel, child.path))
                else:
                    st = child.stat(follow_symlinks=False)
                    seen.setdefault((st.st_dev, st.st_ino), rel)
                    sub.append((rel, child.path))
                continue
            try:
                st = os.stat(child.path)  # Follows links to files.
                size, mtime, mode = st.st_size, st.st_mtime_ns, st.st_mode
            except OSError:
                # A dangling link or an unreadable file: a candidate, reported when read.
                size, mtime, mode = -1, -1, stat.S_IFREG
            reason = ""
            if not stat.S_ISREG(mode):
                reason = f"not a regular file (a {_kind(mode)})"
            elif undecodable:
                reason = "file name is not valid UTF-8 (rename the file, e.g. with convmv)"
            walk.entries.append((rel, size, mtime, reason))
        stack.extend(reversed(sub))  # Depth first, in name order.


def _skip_tree(path: str, rel: str, walk: _Walk) -> None:
    """Skips every file under a folder whose name is not UTF-8, naming each (escaped)."""
    for dirpath, _, filenames in os.walk(path):
        for name in sorted(filenames):
            sub = os.path.relpath(os.path.join(dirpath, name), path).replace(os.sep, "/")
            reason = "folder name is not valid UTF-8 (rename the folder, e.g. with convmv)"
            walk.entries.append((f"{rel}/{display_name(sub)}", -1, -1, reason))


def _walk(root: str) -> _Walk:
    """Every entry under root (a folder, zip or zip folder), sorted by path."""
    zipped = _split_zip(root)
    if zipped is None:
        walk = _walk_folder(root)
    else:
        archive, prefix = zipped
        prefix = f"{prefix}/" if prefix else ""
        try:
            with zipfile.ZipFile(archive) as zf:
                infos = [i for i in zf.infolist() if i.filename.startswith(prefix)]
        except (OSError, zipfile.BadZipFile) as e:
            raise ValueError(
                f"config.data.root: {display_name(archive)!r} is not a readable zip archive ({e})"
            ) from e
        names = [i.filename[len(prefix) :] for i in infos]
        folders = {n.rstrip("/") for n, i in zip(names, infos, strict=True) if i.is_dir()}
        for n in names:
            parts = n.rstrip("/").split("/")
            folders.update("/".join(parts[:k]) for k in range(len(parts)))
        entries = [
            (n, i.file_size, i.CRC, "")
            for n, i in zip(names, infos, strict=True)
            if not i.is_dir() and n
        ]
        walk = _Walk(entries, sorted(folders))
    walk.entries.sort()
    return walk


def scan_tree(root: str, group_depth: int = 0) -> TreeListing:
    """Lists ``ROOT/<group>*group_depth/<identity>/<file>``; raises if there is no such file."""
    if group_depth < 0:
        raise ValueError(f"config.data.group_depth must be >= 0, got {group_depth}")
    root = resolve_root(root)
    walk = _walk(root)
    depth = group_depth + 2
    files, misplaced, skipped = [], [], []
    for rel, _, _, reason in walk.entries:
        parts = rel.rstrip("/").split("/")
        hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
        if hidden:
            continue  # .DS_Store, ._AppleDouble and friends are not data.
        if reason:
            skipped.append((rel, reason))
        else:
            (files if len(parts) == depth else misplaced).append(rel)
    identity_of = ["/".join(f.split("/")[:-1]) for f in files]
    identity_names = sorted(set(identity_of))
    empty = sorted(
        d
        for d in walk.folders
        if d.count("/") == depth - 2
        and d
        and not any(p.startswith(".") or p == "__MACOSX" for p in d.split("/"))
        and d not in set(identity_names)
    )
    if not files:
        raise ValueError(
            f"no image files found in {display_name(root)} at depth ROOT/"
            f"{'<group>/' * group_depth}<identity>/<image> ({len(misplaced)} files elsewhere, "
            f"{len(skipped)} skipped, {len(empty)} empty identity folders); check "
            "config.data.root and config.data.group_depth"
            + "".join(f"\n  skipped {rel}: {reason}" for rel, reason in skipped[:10])
        )
    group_of = ["/".join(f.split("/")[:group_depth]) or "all" for f in files]
    group_names = sorted(set(group_of))
    id_index = {n: i for i, n in enumerate(identity_names)}
    group_index = {n: i for i, n in enumerate(group_names)}
    h = hashlib.sha1(f"{display_name(root)}\n{group_depth}\n".encode())
    for rel, size, mtime, _ in walk.entries:
        if not rel.endswith("/") and rel != ".":  # Files (of any kind), as before links.
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
        skipped=tuple(skipped),
        empty_identities=tuple(empty),
    )


@functools.lru_cache(maxsize=4)
def _zip_handle(archive: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(archive)


def read_file(root: str, rel: str) -> bytes:
    """The bytes of ``rel`` under root (a folder or a zip); OSError when it cannot be read.

    Only a regular file is read: it is opened without blocking and checked, so a named pipe, a
    socket or a device (even one that replaced a file after the listing) raises instead of hanging.
    """
    zipped = _split_zip(root)
    if zipped is None:
        fd = os.open(
            os.path.join(root, *rel.split("/")), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
        )
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise OSError(errno.EINVAL, f"not a regular file (a {_kind(mode)})")
            return f.read()
    archive, prefix = zipped
    try:
        return _zip_handle(archive).read(f"{prefix}/{rel}" if prefix else rel)
    except (KeyError, zipfile.BadZipFile) as e:
        raise OSError(str(e)) from e
