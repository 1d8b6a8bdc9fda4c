"""Owner-only files: what a client, a site or the coordinator keeps for itself (held updates,
kept answers, secrets, privacy budgets)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, readable by the owner only from its first byte.

    The bytes go to a new temporary file beside ``path`` (created 0600, never following a
    symbolic link), are synced, then renamed over ``path``; the temporary file is removed if
    anything fails. The parent folder is created 0700 when missing.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    fd = os.open(temp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def append_private(path: Path, line: str) -> None:
    """Append ``line`` and a newline to ``path`` (created 0600, never through a symbolic link)
    and sync it: once this returns, the line survives a crash (a new file's folder entry is
    synced too)."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "a") as out:
        out.write(line + "\n")
        out.flush()
        os.fsync(out.fileno())
    if created:
        _sync_folder(path.parent)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (its ``.lock`` file) for the block: one reader and
    writer at a time across threads and processes."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
