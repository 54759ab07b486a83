"""Image trees on disk: listing (folder, zip, zip folder), identities with groups, reading."""

from __future__ import annotations

import os
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
