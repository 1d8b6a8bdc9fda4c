"""Owner-only files: what a client, a site or the coordinator keeps for itself (held updates,
kept answers, secrets, privacy budgets)."""

from __future__ import annotations

import os
import threading
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
