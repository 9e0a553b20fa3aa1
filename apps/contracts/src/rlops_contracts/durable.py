"""Files that are either whole or absent: write beside the target, fsync, rename, fsync the directory.

Every writer of something another process reads (model cards, registry files, datasets, checkpoints,
reports, server state, generated configs) goes through :func:`atomic_file` or :func:`replace_atomic`, so
a crash mid-write leaves the previous file (or none), never half of one. The temporary file's name
starts with a dot and holds ``.tmp-``, the pattern the registry's writers clean up after a dead writer.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_path(path: Path | str) -> None:
    """Flush a file's or a directory's entry to disk (a rename is durable once its directory is synced).

    A platform that cannot open or sync a directory (some network and container file systems) skips it:
    the rename is then as durable as that file system makes it.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if Path(path).is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not Path(path).is_dir():
            raise
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` for building it (``.<name>.tmp-<random>``)."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")


@contextmanager
def atomic_file(path: Path | str, *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content to; it replaces ``path`` only when the block ends
    without an exception, after the bytes are on disk. ``mode`` is the new file's permission bits
    (before the umask; secrets want ``0o600``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


def replace_atomic(path: Path | str, data: bytes | str, *, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data`` (text is written as UTF-8) so that readers see the old or the new
    content, never a mix; returns the path."""
    with atomic_file(path, mode=mode) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_new(path: Path | str, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to a file that must not exist yet, and fsync it (for files inside a directory that
    is itself built under a temporary name and renamed into place)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def install_dir(tmp: Path, target: Path) -> None:
    """Move a fully written directory ``tmp`` to ``target`` (a sibling), replacing a previous one.

    The new directory is in place before the old one is removed; between the two renames ``target`` is
    briefly absent, never partly written.
    """
    fsync_path(tmp)
    old: Path | None = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old)
