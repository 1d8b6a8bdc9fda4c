"""A site's on-disk record of what it answered: the replay record and the kept answers.

A site answers each exchange of a run once. The coordinator may ask again (a task retry, a
round repeated for the quorum, a resumed run) with a new nonce; the site then sends the bytes
it kept, so a private family releases nothing new (no second DP noise draw) and a restarted
site, which reloads this record, behaves as if it had never stopped. Answers are keyed by
(run, kind, phase, round, label) and remember the digest of the global state they answered:
the same exchange asked about another state is told apart by the caller.

Layout in the state folder (owner-only: files 0600, folders 0700)::

    record.jsonl            one JSON line per kept answer or answered nonce
    answers/<key-hash>.npz  the kept answer's bytes
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.files import append_private, make_private_folder, write_private

RECORD = "record.jsonl"
ANSWERS = "answers"


@dataclass(frozen=True)
class Kept:
    """An answer the site gave: the state digest it answered, its bytes and its info."""

    state_sha256: str | None
    data: bytes
    info: dict[str, Any]


def _key_hash(key: tuple) -> str:
    return hashlib.sha256(json.dumps(list(key), separators=(",", ":")).encode()).hexdigest()[:32]


class SiteRecord:
    """The replay record and kept answers of one site, in ``folder``.

    Parameters
    ----------
    folder : path
        Created (0700) if missing; an existing record is reloaded.

    Raises
    ------
    ValueError
        If the record file has a line that is not a record entry (a corrupt or foreign file).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        make_private_folder(self.folder / ANSWERS)
        self._answers: dict[str, dict[str, Any]] = {}
        self._nonces: set[str] = set()
        path = self.folder / RECORD
        if path.exists():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    if "nonce" in entry:
                        self._nonces.add(str(entry["nonce"]))
                    else:
                        self._answers[entry["key_hash"]] = entry
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}: line {number} is not a record entry") from err

    def _append(self, entry: dict[str, Any]) -> None:
        append_private(self.folder / RECORD, json.dumps(entry, separators=(",", ":")))

    def kept(self, key: tuple) -> Kept | None:
        """The answer kept under ``key``, or None if the site never answered it."""
        entry = self._answers.get(_key_hash(key))
        if entry is None:
            return None
        data = (self.folder / ANSWERS / f"{entry['key_hash']}.npz").read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"kept answer for {key} was altered on disk (sha256 differs)")
        return Kept(entry["state_sha256"], data, dict(entry["info"]))

    def keep(
        self, key: tuple, state_sha256: str | None, data: bytes, info: dict[str, Any] | None = None
    ) -> Kept:
        """Keep ``data`` as the answer under ``key`` (the answer file first, then its line)."""
        digest = _key_hash(key)
        write_private(self.folder / ANSWERS / f"{digest}.npz", data)
        entry = {
            "key_hash": digest,
            "key": list(key),
            "state_sha256": state_sha256,
            "sha256": hashlib.sha256(data).hexdigest(),
            "info": dict(info or {}),
        }
        self._append(entry)
        self._answers[digest] = entry
        return Kept(state_sha256, data, dict(info or {}))

    def answered(self, nonce: str) -> bool:
        """Whether the request with ``nonce`` was answered (or refused) already."""
        return nonce in self._nonces

    def mark_answered(self, nonce: str) -> None:
        """Record that the request with ``nonce`` has had its answer."""
        if nonce not in self._nonces:
            self._append({"nonce": nonce})
            self._nonces.add(nonce)
