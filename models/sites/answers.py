"""A site's on-disk record of what it answered: the replay record and the kept answers.

A site answers each exchange of a run once. The coordinator may ask again (a task retry, a
round repeated for the quorum, a resumed run) with a new nonce; the site then sends the bytes
it kept, so a private family releases nothing new (no second DP noise draw) and a restarted
site, which reloads this record, behaves as if it had never stopped. Answers are keyed by
(run, kind, phase, round, label) and remember the digest of the global state they answered:
the same exchange asked about another state is told apart by the caller.

Layout in the state folder (owner-only: files 0600, folders 0700)::

    record.jsonl            one JSON line per kept answer, answered nonce or pruned answer
    answers/<key-hash>.npz  the kept answer's bytes

:func:`prune_answers` removes the bytes of old answers and keeps their lines, with a line that
says each was pruned: an exchange asked again after that is refused (:class:`AnswerPruned`),
never answered a second time, so a prune cannot make a site release anything twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.files import append_private, make_private_folder, write_private
from models.sites.messages import exchange_name

RECORD = "record.jsonl"
ANSWERS = "answers"


@dataclass(frozen=True)
class Kept:
    """An answer the site gave: the state digest it answered, its bytes and its info."""

    state_sha256: str | None
    data: bytes
    info: dict[str, Any]


class AnswerPruned(ValueError):
    """An exchange the site answered and whose kept answer is gone (pruned, or removed by
    hand): it is refused, since answering again would release a second answer to it. The
    message names the exchange only, so it is also what the refusal says on the API."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.public = message


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
                    elif "pruned" in entry:
                        self._answers[entry["pruned"]]["pruned"] = True
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
        path = self.folder / ANSWERS / f"{entry['key_hash']}.npz"
        if entry.get("pruned") or not path.exists():
            raise AnswerPruned(
                f"{_exchange(key)} was answered before and its kept answer has been pruned "
                "(fedrec site prune); a site answers an exchange once"
            )
        data = path.read_bytes()
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

    def prunable(self, older_than: float, now: float | None = None) -> list[dict[str, Any]]:
        """The entries of kept answers whose files are older than ``older_than`` seconds, and
        of pruned answers whose files a prune cut short left behind."""
        cutoff = (time.time() if now is None else now) - older_than
        found = []
        for entry in self._answers.values():
            path = self.folder / ANSWERS / f"{entry['key_hash']}.npz"
            if path.exists() and (entry.get("pruned") or path.stat().st_mtime < cutoff):
                found.append(entry)
        return found

    def prune(self, entries: list[dict[str, Any]]) -> None:
        """Remove the files of ``entries``' answers, each after a line that says it was pruned
        (a crash in between leaves a file :meth:`kept` refuses all the same, and the next prune
        removes)."""
        for entry in entries:
            if not entry.get("pruned"):
                self._append({"pruned": entry["key_hash"]})
                entry["pruned"] = True
            (self.folder / ANSWERS / f"{entry['key_hash']}.npz").unlink(missing_ok=True)


@dataclass
class Pruned:
    """What :func:`prune_answers` removed (or would remove): answers, their bytes, their runs."""

    answers: int = 0
    nbytes: int = 0
    runs: set[str] = field(default_factory=set)


def prune_answers(
    folder: str | Path, older_than: float, *, dry_run: bool = False, now: float | None = None
) -> Pruned:
    """Remove the kept answers in ``folder`` (a :class:`SiteRecord`'s) whose files are older
    than ``older_than`` seconds; their record lines stay, so the site refuses those exchanges
    if they are asked again (:class:`AnswerPruned`). The answered nonces and the budget ledger
    (another folder) are not touched. ``dry_run`` removes nothing.

    Raises
    ------
    ValueError
        If the record has a line that is not a record entry (:class:`SiteRecord`).
    """
    record = SiteRecord(folder)
    entries = record.prunable(older_than, now)
    report = Pruned(len(entries), runs={str(e["key"][0]) for e in entries})
    report.nbytes = sum((record.folder / ANSWERS / f"{e['key_hash']}.npz").stat().st_size
                        for e in entries)  # fmt: skip
    if not dry_run:
        record.prune(entries)
    return report


def _exchange(key: tuple) -> str:
    """A record key (run, kind, phase, round, label) in words, as log lines name the exchange
    (:func:`~models.sites.messages.exchange_name`): ``train fit round 3 of run R``."""
    run, kind, phase, round_, label = (list(key) + [""] * 5)[:5]
    return f"{exchange_name(str(kind), str(phase), int(round_ or 0), str(label))} of run {run}"
