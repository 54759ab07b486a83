"""Image trees on disk: listing (folder, zip, zip folder), identities with groups, reading."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import zipfile

import numpy as np
import pytest

from facenet_jax.data import files
from tests.data import trees


def test_scan_tree_lists_files_at_identity_depth(tree):
    root, good, bad, _ = tree
    listing = files.scan_tree(root, group_depth=1)
    # Bad files at identity depth are candidates (preparation decodes and skips them).
    at_depth = set(good) | {rel for rel in bad if rel.count("/") == 2}
    assert set(listing.files) == at_depth
    assert listing.misplaced == ("README",)
    for rel, ident, group in zip(listing.files, listing.identities, listing.groups, strict=True):
        assert listing.identity_names[ident] == rel.rsplit("/", 1)[0]
        assert listing.group_names[group] == rel.split("/")[0]


def test_zip_root_matches_the_folder(tree, tmp_path):
    root, good, _, _ = tree
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel in good:
            zf.write(os.path.join(root, rel), f"top/{rel}")
    listing = files.scan_tree(str(archive / "top"), group_depth=1)
    assert sorted(listing.files) == sorted(good)
    rel = sorted(good)[0]
    with open(os.path.join(root, rel), "rb") as f:
        assert files.read_file(str(archive / "top"), rel) == f.read()
    with pytest.raises(OSError):
        files.read_file(str(archive / "top"), "g0/nobody/x.png")


def test_identity_names_include_the_group(tmp_path):
    # The same identity folder name in two groups (omniglot's character01) is two identities.
    for g in ("a", "b"):
        os.makedirs(tmp_path / g / "char01")
        (tmp_path / g / "char01" / "x.png").write_bytes(
            trees.encode(np.zeros((4, 4), np.uint8), "PNG")
        )
    listing = files.scan_tree(str(tmp_path), group_depth=1)
    assert listing.identity_names == ("a/char01", "b/char01")
    assert listing.group_names == ("a", "b")


def test_signature_changes_with_the_content(tmp_path):
    trees.make_tree(str(tmp_path), groups=1, ids_per_group=2, images=2)
    first = files.scan_tree(str(tmp_path), 1).signature
    assert files.scan_tree(str(tmp_path), 1).signature == first
    (tmp_path / "g0" / "id00" / "new.png").write_bytes(b"x")
    assert files.scan_tree(str(tmp_path), 1).signature != first


def test_relative_roots_resolve_from_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Not the repository: the second candidate must be used.
    resolved = files.resolve_root("configs")
    assert os.path.isfile(os.path.join(resolved, "default.py"))
    with pytest.raises(FileNotFoundError, match="config.data.root"):
        files.resolve_root("no/such/folder")
    with pytest.raises(ValueError, match="config.data.root is empty"):
        files.resolve_root("")


def test_is_image_file():
    assert files.is_image_file("a/b/Face_0001.JPG") and files.is_image_file("x.tiff")
    assert not files.is_image_file("notes.txt") and not files.is_image_file("a/.hidden.jpg")
    assert files.IMAGE_EXTENSIONS[:3] == (".jpg", ".jpeg", ".png")  # LFW lookup order.


# ---------------------------------------------------------- what a folder holds besides images


def _png() -> bytes:
    return trees.encode(np.zeros((4, 4), np.uint8), "PNG")


def _bytes_name(path, raw: bytes) -> str:
    """``path/raw`` with raw bytes that are not UTF-8 (skips where the file system refuses)."""
    name = os.path.join(str(path), os.fsdecode(raw))
    try:
        with open(name, "wb"):
            pass
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    os.remove(name)
    return name


def _read_within(seconds: float, fn):
    """fn()'s outcome ("ok" / the exception) or "hung" when it has not returned in time."""
    out = []

    def run():
        try:
            fn()
            out.append("ok")
        except Exception as e:
            out.append(e)

    thread = threading.Thread(target=run, daemon=True)  # A hung read must not block pytest's exit.
    thread.start()
    thread.join(seconds)
    return out[0] if out else "hung"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_pipes_and_sockets_are_skipped_and_never_opened(tmp_path):
    trees.make_tree(str(tmp_path), groups=1, ids_per_group=2, images=2)
    os.mkfifo(tmp_path / "g0" / "id00" / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock_path = tmp_path / "g0" / "id01" / "s.png"
    try:
        sock.bind(str(sock_path))
    except OSError:
        sock_path = None  # Path too long for AF_UNIX: the pipe alone is tested.
    listing = files.scan_tree(str(tmp_path), 1)
    skipped = dict(listing.skipped)
    assert skipped["g0/id00/pipe.jpg"] == "not a regular file (a named pipe)"
    if sock_path is not None:
        assert skipped["g0/id01/s.png"] == "not a regular file (a socket)"
    assert "g0/id00/pipe.jpg" not in listing.files and len(listing.files) == 4
    # Reading one (a pipe that replaced a listed file) raises at once instead of blocking.
    outcome = _read_within(10, lambda: files.read_file(str(tmp_path), "g0/id00/pipe.jpg"))
    assert isinstance(outcome, OSError) and "named pipe" in str(outcome), outcome
    sock.close()


def test_names_that_are_not_utf8_are_skipped_by_their_escaped_name(tmp_path):
    trees.make_tree(str(tmp_path), groups=1, ids_per_group=2, images=2)
    with open(_bytes_name(tmp_path / "g0" / "id00", b"caf\xe9.jpg"), "wb") as f:
        f.write(_png())
    folder = _bytes_name(tmp_path / "g0", b"J\xfcrgen")
    os.makedirs(folder)
    with open(os.path.join(folder, "1.png"), "wb") as f:
        f.write(_png())
    listing = files.scan_tree(str(tmp_path), 1)  # Raised UnicodeEncodeError, naming no file.
    skipped = dict(listing.skipped)
    assert "not valid UTF-8" in skipped["g0/id00/caf\\xe9.jpg"]
    assert "folder name is not valid UTF-8" in skipped["g0/J\\xfcrgen/1.png"]
    assert listing.identity_names == ("g0/id00", "g0/id01") and len(listing.files) == 4
    assert files.display_name(os.fsdecode(b"caf\xe9")) == "caf\\xe9"
    assert files.display_name("José") == "José"  # Valid UTF-8 stays as it is.


def test_linked_identity_folders_are_followed_once(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    trees.make_tree(str(root), groups=1, ids_per_group=2, images=2)
    os.makedirs(elsewhere / "carol")
    (elsewhere / "carol" / "1.png").write_bytes(_png())
    (elsewhere / "carol" / "2.png").write_bytes(_png())
    os.symlink(elsewhere / "carol", root / "g0" / "carol")  # Outside the tree: followed.
    os.symlink(root / "g0" / "id01", root / "g0" / "a_alias")  # An alias sorting first.
    os.symlink(root, root / "g0" / "id00" / "loop")  # A loop.
    listing = files.scan_tree(str(root), 1)
    assert listing.identity_names == ("g0/carol", "g0/id00", "g0/id01")
    assert {"g0/carol/1.png", "g0/carol/2.png"} <= set(listing.files)
    skipped = dict(listing.skipped)
    # The real folder is the identity, whatever the names' order; the alias names it.
    assert skipped["g0/a_alias/"] == "a link to g0/id01/, which is listed already"
    assert skipped["g0/id00/loop/"] == "a link to ROOT, which is listed already"
    assert files.read_file(str(root), "g0/carol/1.png") == _png()
    # A root that is itself a link is walked.
    os.symlink(root, tmp_path / "root_link")
    assert files.scan_tree(str(tmp_path / "root_link"), 1).files == listing.files


def test_empty_identity_folders_are_counted(tmp_path):
    trees.make_tree(str(tmp_path), groups=2, ids_per_group=1, images=2)
    os.makedirs(tmp_path / "g0" / "nobody")
    os.makedirs(tmp_path / "g1" / "only_subfolders" / "deeper")
    os.makedirs(tmp_path / ".hidden" / "ignored")
    listing = files.scan_tree(str(tmp_path), 1)
    assert listing.empty_identities == ("g0/nobody", "g1/only_subfolders")
    for d in ("a", "b"):
        os.makedirs(tmp_path / "none" / d)
    with pytest.raises(ValueError, match="2 empty identity folders"):
        files.scan_tree(str(tmp_path / "none"))


def test_a_root_that_is_a_file_is_named_as_such(tmp_path):
    photo = tmp_path / "face.jpg"
    photo.write_bytes(_png())
    with pytest.raises(ValueError, match=r"config.data.root: .*face.jpg' is a file, not a folder"):
        files.scan_tree(str(photo))
    fake = tmp_path / "faces.zip"
    fake.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="faces.zip' is not a readable zip archive"):
        files.scan_tree(str(fake))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        files.scan_tree(str(tmp_path / "missing"))
    real = tmp_path / "real.zip"
    with zipfile.ZipFile(real, "w") as zf:
        zf.writestr("alice/1.png", _png())
    assert files.scan_tree(str(real)).files == ("alice/1.png",)  # Zip files are roots.


def test_signature_of_a_plain_tree_is_the_documented_hash(tree):
    """Listing changes must not re-prepare every existing folder: the signature of a tree of
    regular files (and dangling links) is sha1 over root, group_depth and every file's path, size
    and mtime, the formula it has always had, recomputed here with os.walk."""
    root = tree[0]
    rows = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, -1
            rows.append((os.path.relpath(path, root).replace(os.sep, "/"), size, mtime))
    h = hashlib.sha1(f"{root}\n1\n".encode())
    for rel, size, mtime in sorted(rows):
        h.update(f"{rel}\t{size}\t{mtime}\n".encode())
    assert files.scan_tree(root, 1).signature == h.hexdigest()
