"""Owner-only files: what a client, a site or the coordinator keeps for itself (held updates,
kept answers, secrets, privacy budgets)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def write_private(path: Path, data: bytes, what: str = "private file") -> None:
    """Replace ``path`` with ``data`` atomically, readable by the owner only from its first byte.

    The bytes go to a new temporary file beside ``path`` (created 0600, never following a
    symbolic link), are synced, then renamed over ``path``; the temporary file is removed if
    anything fails. The parent folder is created 0700 when missing. Nothing is written in a
    folder that others control (:func:`check_private_folders`, naming the file as ``what``).
    """
    check_private_folders(path, what)
    make_private_folder(path.parent)
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


def make_private_folder(folder: Path) -> None:
    """Create ``folder`` and each missing folder above it 0700, whatever the umask (``mkdir
    -p`` would make the ones above with the umask's mode: 0777 under ``umask 0``, which
    :func:`check_private_folders` then refuses as writable by every user)."""
    missing = []
    folder = Path(folder)
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made in between, by another thread
            os.mkdir(made, 0o700)


def append_private(path: Path, line: str) -> None:
    """Append ``line`` and a newline to ``path`` (created 0600, never through a symbolic link)
    and sync it: once this returns, the line survives a crash (a new file's folder entry is
    synced too). Nothing is written in a folder that others control."""
    check_private_folders(path, "private file")
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


class UnsafeFile(PermissionError):
    """A private file that others could read, replace or point elsewhere; ``folder`` names the
    folder on its way that others control, when that is the reason."""

    one_line = True  # the command line shows the message alone, as the user's to fix

    def __init__(self, message: str, folder: Path | None = None) -> None:
        super().__init__(message)
        self.folder = folder


def read_private(path: Path, what: str, *, public: bool = False) -> bytes:
    """The bytes of ``path``, a file only this user may read or replace (with ``public``,
    one others may read but only this user may replace: a public key the reader trusts).

    Refused with :class:`UnsafeFile` (one line naming the file and the fix) when ``path`` is a
    symbolic link or not a regular file, has a second name (a hard link, which another folder's
    writer could keep), belongs to another user, is readable or writable by group or others (with
    ``public``: writable), or when a folder on its way, as given or as resolved, belongs to
    another user or is writable by others (a sticky folder such as /tmp excepted): whoever can
    write such a folder can swap the file for one whose contents they know. ``what`` names the
    file in the message ("ledger secret", "identity key").

    Raises
    ------
    FileNotFoundError
        When there is no file at ``path``.
    UnsafeFile
        When the file or a folder on its way fails a check above.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafeFile(f"{path}: the {what} is a symbolic link; refused") from err
        if err.errno == errno.EACCES:  # another user's file, say: say whose, not "denied"
            _check_private(path, what, os.lstat(path), public)
        raise
    try:
        _check_private(path, what, os.fstat(fd), public)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def _check_private(path: Path, what: str, info: os.stat_result, public: bool = False) -> None:
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFile(f"{path}: the {what} is not a regular file; refused")
    if info.st_uid != os.geteuid():
        raise UnsafeFile(
            f"{path}: the {what} belongs to {_user(info.st_uid)}, not to {_user(os.geteuid())}"
            "; refused"
        )
    if public and mode & 0o022:
        raise UnsafeFile(
            f"{path}: the {what} has mode {mode:04o}: others may write it; only its owner may "
            f"(chmod 644 {path})"
        )
    if not public and mode & 0o077:
        raise UnsafeFile(
            f"{path}: the {what} has mode {mode:04o}: others may read or write it; it must be 0600 "
            f"(chmod 600 {path})"
        )
    if info.st_nlink != 1:
        raise UnsafeFile(
            f"{path}: the {what} has {info.st_nlink} names (hard links); a private file has "
            "one: copy it and remove the other names"
        )
    check_private_folders(path, what)


def check_private_folders(path: Path, what: str, *, is_folder: bool = False) -> None:
    """Refuse (:class:`UnsafeFile`) a private file's path, existing or to be created, when a
    folder on its way that exists belongs to another user or is writable by others (see
    :func:`read_private`): call it before writing a secret there. With ``is_folder``, ``path``
    is a folder for private files, checked itself too."""
    folders = _folders_on_the_way(path)
    if is_folder:
        folders.append(Path(os.path.realpath(path)))
    for folder in folders:
        if (why := _unsafe_folder(folder)) is not None:
            raise UnsafeFile(
                f"{path}: the {what} is reached through {folder}, which {why}; its folders "
                "must be yours or root's, and writable by no one else",
                folder,
            )


def check_private_path(path: Path, what: str) -> None:
    """What :func:`read_private` checks, of the file at ``path`` when there is one, else of
    the folders a new one would be written in."""
    try:
        read_private(path, what)
    except FileNotFoundError:
        check_private_folders(path, what)


def _folders_on_the_way(path: Path) -> list[Path]:
    """Every folder above ``path`` as written and as resolved, each by its real path (a symbolic
    link to a folder is checked where it sits and where it leads)."""
    given = Path(os.path.abspath(path)).parents
    resolved = Path(os.path.realpath(path)).parents
    return list(dict.fromkeys(Path(os.path.realpath(f)) for f in [*given, *resolved]))


def _unsafe_folder(folder: Path) -> str | None:
    try:
        info = os.stat(folder)
    except FileNotFoundError:  # to be made, by this user
        return None
    if info.st_uid not in (0, os.geteuid()):
        return f"belongs to {_user(info.st_uid)}"
    if info.st_mode & stat.S_ISVTX:  # only an entry's owner may remove or rename it
        return None
    if info.st_mode & stat.S_IWOTH:
        return "every user may write to"
    if info.st_mode & stat.S_IWGRP and not _private_group(info.st_gid):
        others = _other_members(info.st_gid)
        named = f" ({', '.join(others[:5])}{' ...' * (len(others) > 5)})" if others else ""
        return f"the members of group {_group(info.st_gid)}{named} may write to"
    return None


def _private_group(gid: int) -> bool:
    """A group named after this user that no other user is in, listed or by their primary
    group: a user-private group, as ``umask 002`` systems make one per user."""
    try:
        named_mine = grp.getgrgid(gid).gr_name == pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return False
    return named_mine and not _other_members(gid)


def _other_members(gid: int) -> list[str]:
    """The users other than this one in group ``gid``, listed or by their primary group."""
    try:
        listed = set(grp.getgrgid(gid).gr_mem)
    except KeyError:
        listed = set()
    primary = {user.pw_name for user in pwd.getpwall() if user.pw_gid == gid}
    return sorted((listed | primary) - {_name(os.geteuid())})


def _name(uid: int) -> str:
    return _entry(pwd.getpwuid, uid)


def _user(uid: int) -> str:
    name = _name(uid)
    return f"uid {uid}" if name == str(uid) else f"user {name} (uid {uid})"


def _group(gid: int) -> str:
    return _entry(grp.getgrgid, gid)


def _entry(lookup: Callable[[int], Any], number: int) -> str:
    """The name of user or group ``number`` in the system's database, else the number."""
    try:
        return lookup(number)[0]  # pw_name, gr_name
    except KeyError:
        return str(number)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
