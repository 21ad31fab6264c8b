"""The decoded uint8 array cache: shapes, grayscale -> RGB, reuse across processes, invalidation, corrupt files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data.make_fixtures import image_folder, omniglot_npz
from PIL import Image

from neighborlt.data import as_array, fingerprint, load_dataset, read_image_folder, read_omniglot
from neighborlt.errors import DataError
from neighborlt.paths import cache_dir


def test_as_array_files_resize_and_cache(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "f", {"a": 3, "b": 2})
    Image.fromarray(np.full((20, 30), 77, np.uint8), "L").save(root / "a" / "000.png")  # grayscale, not square
    s = read_image_folder(root)
    x = as_array(s, 8)
    assert x.shape == (5, 8, 8, 3) and x.dtype == np.uint8
    assert (x[0] == 77).all()  # grayscale replicated into 3 channels
    ref = np.asarray(Image.open(s.paths[1]).convert("RGB").resize((8, 8), Image.Resampling.BILINEAR))
    assert np.array_equal(x[1], ref)
    cached = cache_dir() / "arrays" / f"{fingerprint(s)}-8.npy"
    assert cached.is_file() and not x.flags.writeable  # memory-mapped, shared read-only
    mtime = cached.stat().st_mtime_ns
    assert np.array_equal(as_array(s, 8), x) and cached.stat().st_mtime_ns == mtime


def test_as_array_reused_by_another_process(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "f", {"a": 2, "b": 2})
    s = read_image_folder(root)
    x = as_array(s, 12)
    code = (
        "import sys; from neighborlt.data import read_image_folder, as_array, fingerprint\n"
        "from neighborlt.paths import cache_dir\n"
        "s = read_image_folder(sys.argv[1]); p = cache_dir() / 'arrays' / (fingerprint(s) + '-12.npy')\n"
        "m = p.stat().st_mtime_ns; a = as_array(s, 12); assert p.stat().st_mtime_ns == m\n"
        "print(int(a.sum()))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, check=True,
                         env=dict(os.environ))
    assert int(out.stdout.strip()) == int(x.sum())


def test_changed_file_is_decoded_again(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "f", {"a": 2})
    s = read_image_folder(root)
    before = np.array(as_array(s, 4))
    time.sleep(0.01)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "a" / "000.png")
    after = as_array(read_image_folder(root), 4)
    assert (after[0] == 0).all() and not np.array_equal(before[0], after[0])


def test_corrupt_file_named(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "f", {"a": 2})
    (root / "a" / "001.png").write_bytes(b"not an image")
    image_set = read_image_folder(root)
    with pytest.raises(DataError, match=r"a/001\.png: cannot decode image"):
        as_array(image_set, 8)
    # no temp file of this set left behind (the arrays folder is shared with other test workers: only this key)
    assert not list((cache_dir() / "arrays").glob(f".{fingerprint(image_set)}-8.*"))


def test_as_array_in_memory_grayscale(tmp_path: Path) -> None:
    s = read_omniglot(omniglot_npz(tmp_path / "o.npz"), "test")
    x = as_array(s, 28)
    assert x.shape == (len(s), 28, 28, 3)
    assert np.array_equal(x[:, :, :, 0], x[:, :, :, 2])
    assert np.array_equal(as_array(s, 105)[3, :, :, 1], s.array[3])  # same size: pixels unchanged


def test_real_cifar10_test_decoded(data_dir: Path) -> None:
    s = load_dataset("cifar10", "test", data_dir)
    x = as_array(s, 32)
    assert x.shape == (10000, 32, 32, 3)
    assert np.array_equal(x[1234], np.asarray(s.load(1234)))


def test_manifest_rows_are_references_into_the_pool(tmp_path: Path) -> None:
    """Pool rows of an array-backed pool stay rows of that array (no copy), beside file rows; the cache decodes every
    one of them with the squash rule (the pool's own pixels at its size, files resized)."""
    from neighborlt.data import ImageSet
    from neighborlt.data.auxiliary import rows_image_set
    from neighborlt.data.pixels import ArrayRow

    pool = ImageSet(class_names=["p", "q"], labels=[0, 1, 1],
                    array=np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8), source="pool")
    f = tmp_path / "x.png"
    Image.fromarray(np.full((30, 20, 3), 200, np.uint8)).save(f)
    rows = [{"location": "pool", "pool_index": 2, "uid": "a"}, {"location": "file", "path": str(f), "uid": "b"},
            {"location": "pool", "pool_index": 0, "uid": "c"}]
    s = rows_image_set(rows, pool, tmp_path, labels=[0, 0, 0])
    assert s.array is None and isinstance(s.paths[0], ArrayRow) and s.paths[0].source.array is pool.array
    assert s.paths[1] == f
    x = as_array(s, 16)
    assert np.array_equal(x[0], pool.array[2]) and np.array_equal(x[2], pool.array[0])
    assert (x[1] == 200).all()
    assert fingerprint(s) != fingerprint(rows_image_set(rows[::-1], pool, tmp_path, labels=[0, 0, 0]))
