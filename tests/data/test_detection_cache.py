"""detection_cache: content-keyed entries (hit/miss by bytes, not path), bad entries are misses,
concurrent writers leave whole entries, and the parallel finder gives the serial values."""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from facenet_jax.data import detection_cache


def digest_box(data: bytes) -> np.ndarray | None:
    """A deterministic stand-in finder (module level: picklable into spawned workers): a box
    from the bytes' hash; "no face" for bytes starting with b"blank"; not an image: b"bad"."""
    if data.startswith(b"bad"):
        raise ValueError("not a decodable image")
    if data.startswith(b"blank"):
        return None
    h = np.frombuffer(hashlib.sha256(data).digest()[:4], np.uint8) / 255.0
    return np.array([h[0] / 2, h[1] / 2, 0.5 + h[2] / 2, 0.5 + h[3] / 2])


def box_cache(tmp_path) -> detection_cache.DetectionCache:
    return detection_cache.DetectionCache(str(tmp_path / "boxes"), "box", (4,))


def test_hit_and_miss_follow_the_content_not_the_name(tmp_path):
    calls = []

    def find(data):
        calls.append(data)
        return digest_box(data)

    cache = box_cache(tmp_path)
    a = b"photo one"
    first = detection_cache.fill([a, b"photo two", a], find, cache, num_workers=1)
    assert calls == [a, b"photo two"], "the same bytes under another name are found once"
    np.testing.assert_array_equal(first[0], first[2])
    # Another process (a fresh cache object) reads the disk; edited bytes are a miss.
    fresh = box_cache(tmp_path)
    again = detection_cache.fill([b"photo two", b"photo one!"], find, fresh, num_workers=1)
    assert calls == [a, b"photo two", b"photo one!"]
    np.testing.assert_array_equal(again[0], first[1])
    np.testing.assert_array_equal(again[1], digest_box(b"photo one!"))


def test_no_face_is_cached_and_unreadable_bytes_are_not(tmp_path):
    cache = box_cache(tmp_path)
    assert detection_cache.fill([b"blank 1", b"bad 1"], digest_box, cache, 1) == [None, None]
    assert cache.get(detection_cache.content_key(b"blank 1")) == (True, None)
    assert cache.get(detection_cache.content_key(b"bad 1")) == (False, None)


@pytest.mark.parametrize(
    "text", ["", "{not json", '{"box": [0.1, 0.2]}', '{"other": 1}', '{"box": [1, 2, 3, NaN]}']
)
def test_a_corrupt_entry_is_a_miss_and_is_rewritten(tmp_path, text):
    cache = box_cache(tmp_path)
    key = detection_cache.content_key(b"photo")
    os.makedirs(os.path.dirname(cache._path(key)))
    with open(cache._path(key), "w") as f:
        f.write(text)
    assert cache.get(key) == (False, None)
    got = detection_cache.fill([b"photo"], digest_box, cache, num_workers=1)
    np.testing.assert_array_equal(got[0], digest_box(b"photo"))
    hit, value = box_cache(tmp_path).get(key)
    assert hit
    np.testing.assert_array_equal(value, digest_box(b"photo"))


def test_cached_computes_once(tmp_path):
    cache, calls = box_cache(tmp_path), []
    for _ in range(3):
        value = detection_cache.cached(b"x", lambda: calls.append(1) or np.ones(4), cache)
        np.testing.assert_array_equal(value, np.ones(4))
    assert len(calls) == 1


def test_parallel_fill_gives_the_serial_values(tmp_path):
    datas = [f"photo {k % 40}".encode() for k in range(100)] + [b"blank", b"bad"]
    serial = detection_cache.fill(datas, digest_box, box_cache(tmp_path / "s"), num_workers=1)
    parallel = detection_cache.fill(
        datas, digest_box, box_cache(tmp_path / "p"), num_workers=2, min_parallel=1
    )
    assert len(parallel) == len(serial) == len(datas)
    for s, p in zip(serial, parallel, strict=True):
        assert (s is None) == (p is None)
        if s is not None:
            np.testing.assert_array_equal(s, p)
    assert len(glob.glob(str(tmp_path / "p" / "boxes" / "*" / "*.json"))) == 41  # 40 + blank


WRITER = """
import sys, numpy as np
from facenet_jax.data import detection_cache
cache = detection_cache.DetectionCache(sys.argv[1], "box", (4,))
for i in range(60):
    key = detection_cache.content_key(str(i % 20).encode())
    cache.put(key, None if i % 20 == 0 else np.full(4, i % 20 / 100.0))
"""


def test_concurrent_writers_leave_whole_entries(tmp_path):
    folder = str(tmp_path / "cache")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, folder]) for _ in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert len(glob.glob(os.path.join(folder, "*", "*"))) == 20, "no temporary files left"
    cache = detection_cache.DetectionCache(folder, "box", (4,))
    for i in range(20):
        hit, value = cache.get(detection_cache.content_key(str(i).encode()))
        assert hit
        if i == 0:
            assert value is None
        else:
            np.testing.assert_allclose(value, np.full(4, i / 100.0))


def test_get_cache_is_per_kind_detector_and_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FACENET_JAX_CACHE", str(tmp_path))
    boxes = detection_cache.get_cache("boxes", "box", (4,), "mtcnn")
    assert boxes.directory == str(tmp_path / "boxes" / f"mtcnn-v{detection_cache.CACHE_VERSION}")
    assert detection_cache.get_cache("boxes", "box", (4,), "mtcnn") is boxes
    other = detection_cache.get_cache("landmarks", "landmarks", (5, 2), "mtcnn", str(tmp_path))
    assert other.directory != boxes.directory and other.shape == (5, 2)
