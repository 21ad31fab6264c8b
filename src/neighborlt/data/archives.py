"""Safe, once-only extraction of dataset archives (``.tar.gz``, ``.tgz``, ``.tar``, ``.zip``) into the cache.

Members are treated as hostile: absolute paths, ``..`` components, links and device files are rejected
before anything is written. Extraction goes to a temporary directory next to the destination, which is
renamed into place only when complete, and a marker file records success, so a crash mid-extract leaves
nothing that looks finished and the next call extracts again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError
from ..paths import cache_dir
from ..rundir import atomic_write_json

logger = logging.getLogger(__name__)

MARKER = ".neighborlt-extracted.json"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def is_archive(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` names a supported archive by its suffix."""
    name = str(path).lower()
    return name.endswith(ARCHIVE_SUFFIXES)


def _check_member_name(archive: Path, name: str) -> None:
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"{archive}: member {name!r} has an absolute path; refusing to extract (re-create the archive)")
    if ".." in posix.split("/"):  # a '..' component (string split: a path object per member cost ~1 s on 110k)
        raise DataError(f"{archive}: member {name!r} contains '..'; refusing to extract (re-create the archive)")


def _archive_key(archive: Path) -> str:
    st = archive.stat()
    blob = f"{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _write_member(dest: str, name: str, data: bytes, made: set[str]) -> None:
    out = os.path.join(dest, name)
    parent = os.path.dirname(out)
    if parent not in made:
        os.makedirs(parent, exist_ok=True)
        made.add(parent)
    with open(out, "wb") as f:
        f.write(data)


def _extract_tar(archive: Path, dest: Path) -> int:
    n = 0
    made: set[str] = set()
    try:
        with tarfile.open(archive, "r|*") as tf:  # one forward pass (each member is read as it streams by)
            for m in tf:
                _check_member_name(archive, m.name)
                if m.issym() or m.islnk():
                    raise DataError(f"{archive}: member {m.name!r} is a link; refusing to extract (re-create the archive)")
                if m.isdir():
                    continue  # folders are created for the files they hold
                if not m.isfile():
                    raise DataError(f"{archive}: member {m.name!r} is not a regular file; refusing to extract")
                src = tf.extractfile(m)
                assert src is not None  # regular file
                _write_member(str(dest), m.name, src.read(), made)
                n += 1
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{archive}: cannot read archive ({e}); download it again") from None
    return n


def _extract_zip(archive: Path, dest: Path) -> int:
    n = 0
    made: set[str] = set()
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_member_name(archive, info.filename)
                mode = (info.external_attr >> 16) & 0o170000
                if mode == 0o120000:  # S_IFLNK stored by unix zip tools
                    raise DataError(f"{archive}: member {info.filename!r} is a link; refusing to extract")
                if info.is_dir():
                    continue
                _write_member(str(dest), info.filename, zf.read(info), made)
                n += 1
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{archive}: cannot read archive ({e}); download it again") from None
    return n


def extract_archive(archive: str | os.PathLike[str], dest_root: str | os.PathLike[str] | None = None) -> Path:
    """Extract ``archive`` once and return the directory holding its contents.

    Args:
        archive: a ``.tar.gz``/``.tgz``/``.tar``/``.zip`` file.
        dest_root: where extracted folders live (default ``cache_dir()/extracted``).

    Returns:
        ``<dest_root>/<archive stem>-<key>``, where the key changes when the archive file changes.

    Raises:
        DataError: missing or unreadable archive, or a hostile member (absolute path, ``..``, link).

    Example:
        >>> root = extract_archive("/data/cifar10.tar.gz")  # doctest: +SKIP
        >>> sorted(p.name for p in root.iterdir())  # doctest: +SKIP
        ['cifar10']
    """
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"{archive}: archive not found")
    root = Path(dest_root) if dest_root is not None else cache_dir() / "extracted"
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()  # canonical paths: fingerprints of the extracted files do not depend on symlinks
    stem = archive.name
    for suf in ARCHIVE_SUFFIXES:
        if stem.lower().endswith(suf):
            stem = stem[: -len(suf)]
            break
    dest = root / f"{stem}-{_archive_key(archive)}"
    if (dest / MARKER).is_file():
        return dest
    # processes sharing the cache (test workers, ranks) extract one at a time: the second waits for the first's copy
    # instead of writing its own (110k files of Tiny-ImageNet are a minute of CPU, mostly the kernel's)
    with _exclusive(root / f".{dest.name}.lock"):
        if (dest / MARKER).is_file():
            return dest
        if dest.exists():  # an earlier crash left a partial copy without the marker
            logger.warning("re-extracting %s: previous extraction in %s is incomplete", archive, dest)
            shutil.rmtree(dest)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{stem}.", suffix=".partial"))
        try:
            logger.info("extracting %s into %s (once)", archive, dest)
            if archive.name.lower().endswith(".zip"):
                n = _extract_zip(archive, tmp)
            else:
                n = _extract_tar(archive, tmp)
            atomic_write_json(tmp / MARKER, {"archive": str(archive), "files": n})
            try:
                os.rename(tmp, dest)
            except OSError:
                if (dest / MARKER).is_file():  # another process (without the lock: another host) won the race
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``path`` (released by the kernel if the holder dies)."""
    import fcntl

    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
