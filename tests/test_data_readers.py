"""Readers on generated fixtures in each layout and on the real offline copies; archives; every bad-input error."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from data.make_fixtures import cifar_pickles, image_folder, inat_json, omniglot_npz, split_file, tiny_imagenet

from neighborlt.data import (
    load_dataset,
    read_cifar_pickles,
    read_image_folder,
    read_inat_json,
    read_omniglot,
    read_split_file,
    read_tiny_imagenet,
)
from neighborlt.data.archives import MARKER, extract_archive
from neighborlt.data.readers import read_class_names
from neighborlt.errors import ConfigError, DataError


# ------------------------------------------------------------------------------------------ generated fixtures
def test_image_folder(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "f", {"b_cls": 3, "a_cls": 2})
    s = read_image_folder(root)
    assert s.class_names == ["a_cls", "b_cls"]
    assert s.counts().tolist() == [2, 3]
    assert s.load(0).mode == "RGB" and s.load(0).size == (16, 16)


def test_split_file_with_class_names(tmp_path: Path) -> None:
    f = split_file(tmp_path, [0, 1, 1, 2, 2, 2], ["cat", "dog", "bird"])
    s = read_split_file(f)
    assert s.class_names == ["cat", "dog", "bird"]
    assert s.counts().tolist() == [1, 2, 3]
    assert s.paths[0] == tmp_path / "images" / "000.jpg"


def test_split_file_indexed_names_and_no_names(tmp_path: Path) -> None:
    f = split_file(tmp_path, [1, 0, 1], None)
    assert read_split_file(f).class_names == ["0", "1"]
    f.write_text("images/000.jpg\t1\nimages/001.jpg   0\n")  # tabs and runs of spaces separate the label too
    assert read_split_file(f).labels.tolist() == [1, 0]
    f = split_file(tmp_path, [1, 0, 1], None)
    (tmp_path / "names.txt").write_text("1 dog\n0 cat\n")
    assert read_split_file(f, class_names_file=tmp_path / "names.txt").class_names == ["cat", "dog"]


def test_tiny_imagenet_layout(tmp_path: Path) -> None:
    root = tiny_imagenet(tmp_path / "tiny", ["n02085620", "n01443537"])
    tr = read_tiny_imagenet(root, "train")
    assert tr.class_ids == ["n02085620", "n01443537"]
    assert tr.class_names == ["Chihuahua", "goldfish"]
    assert tr.synonyms["n01443537"] == ["goldfish", "Carassius auratus"]
    assert tr.counts().tolist() == [3, 3]
    assert tr.load(0).mode == "RGB"  # the first image is grayscale on disk
    va = read_tiny_imagenet(root, "val")
    assert va.counts().tolist() == [2, 2] and va.class_ids == tr.class_ids
    assert load_dataset(str(root), "test").counts().tolist() == [2, 2]


@pytest.mark.parametrize("variant,n_classes", [("cifar10", 3), ("cifar100", 4)])
def test_cifar_pickles(tmp_path: Path, variant: str, n_classes: int) -> None:
    root = cifar_pickles(tmp_path / variant, variant)
    tr = read_cifar_pickles(root, "train")
    te = load_dataset(str(root), "test")
    assert tr.num_classes == n_classes and tr.array.shape[1:] == (32, 32, 3)
    assert len(tr) == (30 if variant == "cifar10" else 6) and len(te) == 6
    # the channel layout is the official one: 1024 red, then green, then blue values, row-major
    with open(root / ("test_batch" if variant == "cifar10" else "test"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    assert np.array_equal(te.array[0, :, :, 1], raw[0, 1024:2048].reshape(32, 32))


def test_inat_json(tmp_path: Path) -> None:
    s = read_inat_json(inat_json(tmp_path))
    assert s.class_ids == ["2", "7", "30"]  # sorted by category id
    assert s.class_names == ["Plantae", "Aves", "Insecta"]
    assert s.counts().tolist() == [2, 2, 2]
    assert load_dataset(str(tmp_path / "train2018.json")).num_classes == 3


def test_omniglot_npz_generated(tmp_path: Path) -> None:
    p = omniglot_npz(tmp_path / "o.npz")
    tr, te = read_omniglot(p, "train"), read_omniglot(p, "test")
    assert tr.counts().tolist() == [15] * 8 and te.counts().tolist() == [5] * 8
    assert tr.array.shape[1:] == (105, 105)
    assert tr.load(0).mode == "RGB"


# ------------------------------------------------------------------------------------------ archives
def _tar_with(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tf.addfile(info)
    return path


def test_archive_extract_once_and_load(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "src" / "ds" / "train", {"x": 2, "y": 2})
    arc = tmp_path / "ds.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(folder.parent, arcname="ds")
    dest = extract_archive(arc, tmp_path / "cache")
    assert (dest / MARKER).is_file()
    mtime = (dest / MARKER).stat().st_mtime_ns
    assert extract_archive(arc, tmp_path / "cache") == dest
    assert (dest / MARKER).stat().st_mtime_ns == mtime  # not extracted twice
    assert load_dataset(str(arc)).counts().tolist() == [2, 2]
    # zip works the same way
    z = tmp_path / "ds.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(folder.rglob("*.png")):
            zf.write(p, arcname=str(p.relative_to(folder.parent.parent)))
    assert load_dataset(str(z)).counts().tolist() == [2, 2]


def test_archive_without_marker_is_re_extracted(tmp_path: Path) -> None:
    arc = _tar_with(tmp_path / "a.tar.gz", {"a/one.txt": b"1", "a/two.txt": b"2"})
    dest = extract_archive(arc, tmp_path / "cache")
    (dest / MARKER).unlink()  # as if the process died before finishing
    (dest / "a" / "two.txt").unlink()
    dest2 = extract_archive(arc, tmp_path / "cache")
    assert dest2 == dest and (dest / "a" / "two.txt").read_bytes() == b"2" and (dest / MARKER).is_file()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("bad,match", [("../evil.txt", r"'\.\.'"), ("/abs/evil.txt", "absolute")])
def test_archive_rejects_hostile_paths(tmp_path: Path, bad: str, match: str) -> None:
    arc = _tar_with(tmp_path / "bad.tar.gz", {"ok/a.txt": b"a", bad: b"x"})
    with pytest.raises(DataError, match=match):
        extract_archive(arc, tmp_path / "cache")
    assert not (tmp_path / "evil.txt").exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"]  # the partial extraction was removed


def test_concurrent_extractions_write_one_copy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two extractions of one archive at once (test workers or ranks sharing the cache): one extracts, the other
    waits for its copy instead of writing a second one."""
    import logging
    import threading

    arc = _tar_with(tmp_path / "c.tar.gz", {f"d/{i}.bin": os.urandom(2000) for i in range(300)})
    start = threading.Barrier(2)
    out: list[Path] = []

    def extract() -> None:
        start.wait()
        out.append(extract_archive(arc, tmp_path / "cache"))

    with caplog.at_level(logging.INFO, logger="neighborlt.data.archives"):
        threads = [threading.Thread(target=extract) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(out) == 2 and out[0] == out[1] and len(list((out[0] / "d").iterdir())) == 300
    assert caplog.text.count("extracting ") == 1, caplog.text
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".partial")]


def test_archive_rejects_links(tmp_path: Path) -> None:
    arc = _tar_with(tmp_path / "l.tar.gz", {"ok/a.txt": b"a"}, link="ok/passwd")
    with pytest.raises(DataError, match="link"):
        extract_archive(arc, tmp_path / "cache")
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("../up.txt", b"x")
    with pytest.raises(DataError, match=r"'\.\.'"):
        extract_archive(z, tmp_path / "cache")


def test_truncated_archive(tmp_path: Path) -> None:
    arc = _tar_with(tmp_path / "t.tar.gz", {f"d/{i}.bin": os.urandom(5000) for i in range(5)})
    arc.write_bytes(arc.read_bytes()[:3000])
    with pytest.raises(DataError, match="cannot read archive"):
        extract_archive(arc, tmp_path / "cache")


def test_concurrent_decodes_write_one_array(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two decodes of one image set at once into the shared decoded-array cache: one decodes, the other waits and
    loads its array."""
    import logging
    import threading

    from neighborlt.data import as_array

    images = read_image_folder(image_folder(tmp_path / "f", {"a": 150, "b": 150}))
    start = threading.Barrier(2)
    out: list[np.ndarray] = []

    def decode() -> None:
        start.wait()
        out.append(as_array(images, 8, workers=1))

    with caplog.at_level(logging.INFO, logger="neighborlt.data.arrays"):
        threads = [threading.Thread(target=decode) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(out) == 2 and out[0].shape == (300, 8, 8, 3) and np.array_equal(out[0], out[1])
    assert caplog.text.count("decoded 300 images") == 1, caplog.text


# ------------------------------------------------------------------------------------------ bad input
def test_label_out_of_range_names_file_and_line(tmp_path: Path) -> None:
    f = split_file(tmp_path, [0, 1, 0], ["cat", "dog"])
    f.write_text(f.read_text() + "images/000.jpg 2\n")
    with pytest.raises(DataError, match=r"train\.txt:4: label 2 is out of range 0\.\.1"):
        read_split_file(f)


def test_empty_class_from_class_names_file(tmp_path: Path) -> None:
    split_file(tmp_path, [0, 0, 2], ["cat", "dog", "bird"])
    with pytest.raises(DataError, match=r"classnames\.txt:2: class 1 \('dog'\) has no images"):
        read_split_file(tmp_path / "train.txt")


def test_class_names_disagree_and_malformed(tmp_path: Path) -> None:
    f = split_file(tmp_path, [0, 1], None)
    (tmp_path / "names.txt").write_text("0 cat\n0 dog\n")
    with pytest.raises(DataError, match=r"names\.txt:2: class index 0 appears twice"):
        read_split_file(f, class_names_file=tmp_path / "names.txt")
    (tmp_path / "names.txt").write_text("0 cat\n2 dog\n")
    with pytest.raises(DataError, match="index 1 is missing"):
        read_class_names(tmp_path / "names.txt")
    f.write_text("images/000.jpg 0\nimages/001.jpg dog\n")
    with pytest.raises(DataError, match=r"train\.txt:2: expected 'relative/path label'"):
        read_split_file(f)
    f.write_text("images/000.jpg 0\nimages/nope.jpg 0\n")
    with pytest.raises(DataError, match=r"train\.txt:2: image .*nope\.jpg not found"):
        read_split_file(f)
    f.write_text("../outside.jpg 0\n")
    with pytest.raises(DataError, match="without '..'"):
        read_split_file(f)


def test_empty_image_folder_class(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "f", {"a": 2})
    (root / "b").mkdir()
    with pytest.raises(DataError, match=r"f/b: class folder has no images"):
        read_image_folder(root)


def test_corrupt_image_error_and_skip(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "f", {"a": 3, "b": 2})
    bad = root / "a" / "001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    s = read_image_folder(root)  # listing does not decode
    with pytest.raises(DataError, match=r"001\.png: cannot decode image .*--skip-corrupt"):
        s.load(int(np.flatnonzero([p == bad for p in s.paths])[0]))
    with pytest.raises(DataError, match=r"001\.png: cannot decode image"):
        read_image_folder(root, verify=True)
    ok = load_dataset(str(root), skip_corrupt=True)
    assert ok.counts().tolist() == [2, 2] and ok.skipped == [str(bad)]


def test_tiny_imagenet_bad_annotation(tmp_path: Path) -> None:
    root = tiny_imagenet(tmp_path / "tiny", ["n02085620", "n01443537"])
    ann = root / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_annotations\.txt:5: class 'n99999999' is not in .*wnids\.txt"):
        read_tiny_imagenet(root, "val")
    (root / "wnids.txt").write_text("n02085620\nn01443537\nn02094433\n")
    with pytest.raises(DataError, match=r"train/n02094433/images: missing training folder"):
        read_tiny_imagenet(root, "train")


def test_cifar_hostile_pickle_and_bad_labels(tmp_path: Path) -> None:
    root = cifar_pickles(tmp_path / "c", "cifar10")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(DataError, match=r"test_batch: not a valid CIFAR python pickle .*not allowed"):
        read_cifar_pickles(root, "test")
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 7]}, f)
    with pytest.raises(DataError, match=r"test_batch: label 7 of sample 1 is out of range 0\.\.2"):
        read_cifar_pickles(root, "test")


def test_inat_bad_entries(tmp_path: Path) -> None:
    import json

    p = inat_json(tmp_path)
    doc = json.loads(p.read_text())
    doc["annotations"][0]["category_id"] = 99
    p.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="category_id 99, not in 'categories'"):
        read_inat_json(p)
    p.write_text('{"images": [}')
    with pytest.raises(DataError, match=r"train2018\.json:1: invalid JSON"):
        read_inat_json(p)


def test_missing_dataset_message(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", data_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "--download" in msg and "cifar-100-python" in msg
    with pytest.raises(DataError, match="not a known name"):
        load_dataset(str(tmp_path / "nothing-here"))
    with pytest.raises(ConfigError, match="split"):
        read_omniglot(omniglot_npz(tmp_path / "o.npz"), "validation")


# ------------------------------------------------------------------------------------------ real offline copies
def test_real_cifar10(data_dir: Path) -> None:
    tr, te = load_dataset("cifar10", "train", data_dir), load_dataset("cifar10", "test", data_dir)
    assert tr.class_names[:3] == ["airplane", "automobile", "bird"] and tr.num_classes == 10
    assert tr.counts().tolist() == [5000] * 10 and te.counts().tolist() == [1000] * 10
    assert tr.load(0).size == (32, 32)


def test_real_omniglot(data_dir: Path) -> None:
    tr, te = load_dataset("omniglot", "train", data_dir), load_dataset("omniglot", "test", data_dir)
    assert tr.num_classes == 242 and len(tr) == 242 * 15 and len(te) == 242 * 5
    assert tr.class_names[0] == "Balinese/character01"
    assert tr.array.dtype == np.uint8 and tr.array.min() == 0 and tr.array.max() == 255


@pytest.mark.slow
def test_real_tiny_imagenet(data_dir: Path) -> None:
    from PIL import Image

    from neighborlt.data import as_array

    tr, va = load_dataset("tiny-imagenet", "train", data_dir), load_dataset("tiny-imagenet", "test", data_dir)
    assert tr.num_classes == 200 and len(tr) == 100_000 and tr.counts().tolist() == [500] * 200
    assert va.counts().tolist() == [50] * 200 and va.class_ids == tr.class_ids
    assert tr.class_ids[0] == "n02124075" and tr.class_names[0] == "Egyptian cat"  # official wnids.txt order
    assert tr.class_names[tr.class_ids.index("n01443537")] == "goldfish"
    assert "Carassius auratus" in tr.synonyms["n01443537"]
    gray = next(i for i, p in enumerate(va.paths) if Image.open(p).mode == "L")
    rows = np.union1d(np.arange(500), [gray])  # 500 real JPEGs and a grayscale one prove what 10,000 would
    some = va.subset(rows)
    x = as_array(some, 32)  # decoded once per session (cached on disk, memory-mapped)
    assert x.shape == (len(rows), 32, 32, 3) and len(rows) >= 500
    g = int(np.searchsorted(rows, gray))
    assert np.array_equal(x[g, :, :, 0], x[g, :, :, 2])
    assert as_array(some, 32) is not x and np.array_equal(as_array(some, 32)[:50], x[:50])


@pytest.mark.network
def test_cifar_download_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--download fetches, checks and reads the official-format archive (served from 127.0.0.1 here)."""
    import functools
    import hashlib
    import http.server
    import threading

    import torchvision

    src = cifar_pickles(tmp_path / "src" / "cifar-10-batches-py", "cifar10")
    served = tmp_path / "www"
    served.mkdir()
    with tarfile.open(served / "cifar-10-python.tar.gz", "w:gz") as tf:
        tf.add(src, arcname="cifar-10-batches-py")

    def md5(p: Path) -> str:
        return hashlib.md5(p.read_bytes()).hexdigest()

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cls = torchvision.datasets.CIFAR10
        monkeypatch.setattr(cls, "url", f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz")
        monkeypatch.setattr(cls, "tgz_md5", md5(served / "cifar-10-python.tar.gz"))
        monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", md5(src / f"data_batch_{i}")] for i in range(1, 6)])
        monkeypatch.setattr(cls, "test_list", [["test_batch", md5(src / "test_batch")]])
        empty = tmp_path / "no-data"
        empty.mkdir()
        with pytest.raises(DataError, match="--download"):
            load_dataset("cifar10", "train", empty)
        tr = load_dataset("cifar10", "train", empty, download=True)
        assert tr.num_classes == 3 and len(tr) == 30
        assert load_dataset("cifar10", "test", empty).counts().tolist() == [2, 2, 2]  # found in the cache now
        monkeypatch.setenv("NEIGHBORLT_CACHE", str(tmp_path / "fresh-cache"))  # nothing downloaded there yet
        monkeypatch.setattr(cls, "tgz_md5", "0" * 32)
        monkeypatch.setattr(cls, "test_list", [["test_batch", "0" * 32]])
        with pytest.raises(DataError, match="cifar10: download from .* failed"):
            load_dataset("cifar10", "train", empty, download=True)
    finally:
        server.shutdown()
        server.server_close()
