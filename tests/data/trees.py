"""Helpers shared by the data tests: image trees on disk (every format, bad files) and configs."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from configs import default

FORMATS = ("JPEG", "PNG", "PPM", "GIF", "BMP")  # PPM/PGM: Pillow's netpbm writer.
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "PPM": ".pgm", "GIF": ".gif", "BMP": ".bmp"}


def encode(image: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kw)
    return buf.getvalue()


def face(rng: np.random.Generator, ident: int, grey: bool, h: int, w: int) -> np.ndarray:
    """A smooth image whose colour depends on the identity, plus noise; grey or RGB."""
    base = np.array([40 + 50 * (ident % 4), 200 - 30 * (ident % 5), 60 + 20 * (ident % 7)])
    img = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return img.mean(-1).astype(np.uint8) if grey else img


def make_tree(root: str, *, groups: int = 2, ids_per_group: int = 4, images: int = 4, seed=0):
    """ROOT/g<k>/id<k><j>/<n>.<ext>: every format, grey and RGB, odd sizes.

    Returns {relative path: identity name} of the good images.
    """
    rng = np.random.default_rng(seed)
    good = {}
    for g in range(groups):
        for j in range(ids_per_group):
            ident = g * ids_per_group + j
            name = f"g{g}/id{ident:02d}"
            os.makedirs(os.path.join(root, name), exist_ok=True)
            for n in range(images):
                fmt = FORMATS[(ident + n) % len(FORMATS)]
                grey = fmt == "PPM" or (n % 3 == 0 and fmt != "GIF")
                h, w = 20 + 3 * n, 18 + 2 * ident
                img = face(rng, ident, grey, h, w)
                if fmt == "GIF":
                    img = img if img.ndim == 2 else img[..., 0]
                rel = f"{name}/{n}{SUFFIX[fmt]}"
                with open(os.path.join(root, rel), "wb") as f:
                    f.write(encode(img, fmt))
                good[rel] = name
    return good


def add_bad_files(root: str) -> dict[str, str]:
    """Every bad-file case; returns {relative path: word expected in the skip reason}."""
    jpeg = encode(np.full((32, 32, 3), 128, np.uint8), "JPEG")
    bad = {
        "g0/id00/corrupt.jpg": (b"\xff\xd8\xff\xe0" + os.urandom(200), "decodable"),
        "g0/id00/truncated.jpg": (jpeg[: len(jpeg) // 2], "decodable"),
        "g0/id01/empty.png": (b"", "empty"),
        "g0/id01/notes.txt": (b"not an image at all\n", "decodable"),
        "README": (b"a file outside the identity folders", "not at ROOT"),
    }
    for rel, (data, _) in bad.items():
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    os.symlink(os.path.join(root, "missing-target.jpg"), os.path.join(root, "g1/id04/dangling.jpg"))
    reasons = {rel: word for rel, (_, word) in bad.items()}
    reasons["g1/id04/dangling.jpg"] = "unreadable"
    return reasons


def folder_config(root: str, data_dir: str, **data):
    """The default config on a folder source: RGB 16x16, P 4 x K 3, every augmentation."""
    config = default.get_config()
    d = config.data
    d.source = "folder"
    d.root = root
    d.group_depth = 1
    d.data_dir = data_dir
    d.channels = 3
    d.image_size = 16
    d.identities_per_batch = 4
    d.images_per_identity = 3
    d.val_fraction = 0.25
    d.test_fraction = 0.25
    d.augment = ("random_crop", "flip", "color")
    for k, v in data.items():
        d[k] = v
    return config
