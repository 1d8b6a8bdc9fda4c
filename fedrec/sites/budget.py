"""A site's privacy budget on its own disk: every DP release it made, and the cap it keeps.

The arithmetic is :mod:`models.sites.budget` (what one release costs within its run) and
:mod:`models.privacy.ledger` (per-user balances across runs). This module keeps the entries
(one JSON line per charged release, appended and fsynced before the release is computed, so a
crash can only over-count; a line it cut short stops the site until its operator repairs the
file: :class:`LedgerUnreadable`) and the sets of users each entry covers, in ``<state>/budget/``
(owner-only). User ids never leave the site; the site keys them with a random secret of its own
so that the files hold no id in the clear.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import get_args

import numpy as np

from models.files import (
    append_private,
    check_private_folders,
    folder_lock,
    make_private_folder,
    read_private,
    write_private,
)
from models.privacy.ledger import Entry, Stored, standing, user_keys
from models.sites.budget import (
    DEFAULT_MAX_DELTA,
    RUNS_PER_DELTA_CAP,
    Release,
    ReleaseKind,
    SiteBudgetError,
    charge,
)

ENTRIES = "entries.jsonl"
SECRET = "secret"
_ENTRY_FIELDS = {"run", "release", "epsilon", "delta", "users_sha256", "at"}


class LedgerUnreadable(SiteBudgetError):
    """A line of the site's ``entries.jsonl`` that is not a whole entry (a write cut short by a
    crash, an edit). Dropping it would free what it charged, so the site does not start on it,
    and no charge is made past it until its operator repairs the file."""

    one_line = True  # the command line shows the message alone, as the operator's to fix

    def __init__(self, path: Path, number: int) -> None:
        super().__init__(
            f"{path}, line {number}: not a whole entry of this site's privacy budget (a write "
            "cut short by a crash, or an edit), so what its users have spent cannot be "
            "counted; refused rather than reset or under-counted: restore the file from a "
            "backup, or remove that line by hand (what it charged is then no longer counted)",
            public="privacy budget of this site: its ledger cannot be read (the site's own log "
            "says why): refused",
        )


@dataclass(frozen=True)
class Charged:
    """What a charge left: the run's epsilon so far, and the most any user of the site has
    spent in all (epsilon, delta)."""

    run_epsilon: float
    epsilon: float
    delta: float


class SiteBudget:
    """The budget of the users in one site's data.

    Parameters
    ----------
    folder : path
        ``<state>/budget``: created 0700 when missing, reloaded when present.
    user_ids : numpy.ndarray
        The ids (as text) of the users with rows at the site now.
    max_epsilon : float
        No user of the site may pass this epsilon, summed over runs.
    max_delta : float or None
        The same for delta, at most 1 / the site's users (default:
        :data:`~models.sites.budget.DEFAULT_MAX_DELTA`, a public number: a cap derived from the
        count of users would let the site's refusals give the count away); each run is
        accounted at ``max_delta / RUNS_PER_DELTA_CAP``.

    Raises
    ------
    SiteBudgetError
        When the delta cap is above 1 / the site's users (a release may then expose one user's
        rows whole with that probability).
    """

    def __init__(
        self,
        folder: Path,
        user_ids: np.ndarray,
        *,
        max_epsilon: float,
        max_delta: float | None = None,
    ) -> None:
        if not max_epsilon > 0:
            raise ValueError(f"max_epsilon={max_epsilon} must be > 0")
        n_users = len(user_ids)
        if n_users * (DEFAULT_MAX_DELTA if max_delta is None else max_delta) > 1:
            given = "the default" if max_delta is None else "--max-delta"
            raise SiteBudgetError(
                f"{given} delta cap {max_delta or DEFAULT_MAX_DELTA:g} is above 1 / the site's "
                f"{n_users} users ({1 / n_users:.3g}): with that probability a release may "
                "expose one user's rows whole; allowed: --max-delta at most 1 / users, a round "
                "number (the coordinator learns it from the site's refusals)"
            )
        self.folder = Path(folder)
        check_private_folders(self.folder / SECRET, "site secret")  # before making anything
        make_private_folder(self.folder)
        self.max_epsilon = float(max_epsilon)
        self.max_delta = DEFAULT_MAX_DELTA if max_delta is None else float(max_delta)
        self.run_delta = self.max_delta / RUNS_PER_DELTA_CAP
        self.secret = self._secret()  # the site's own: names its users, keys its fingerprint
        with folder_lock(self.folder):  # a site does not start on a ledger it cannot count
            self._lines()
        self.users = user_keys(np.asarray(user_ids, dtype=str), self.secret)
        self._users_sha = self._keep_users(self.users)

    def _secret(self) -> bytes:
        path = self.folder / SECRET
        if not path.exists():
            write_private(path, os.urandom(32), "site secret")
        return read_private(path, "site secret")

    def _keep_users(self, keys: np.ndarray) -> str:
        data = np.sort(keys).astype("<u8").tobytes()
        digest = hashlib.sha256(data).hexdigest()
        path = self.folder / f"users-{digest[:32]}.u64"
        if not path.exists():
            write_private(path, data)
        return digest

    def _users_of(self, digest: str) -> np.ndarray | None:
        path = self.folder / f"users-{digest[:32]}.u64"
        try:
            data = path.read_bytes()
        except OSError:
            return None  # a lost set counts for everyone: an over-count, never a freed budget
        if hashlib.sha256(data).hexdigest() != digest:
            return None
        return np.frombuffer(data, dtype="<u8").astype(np.uint64)

    def _lines(self) -> list[dict]:
        """Every entry of the ledger, each checked whole.

        Raises
        ------
        LedgerUnreadable
            At the first line that is not a whole entry; a torn last line too (dropping it
            would under-count).
        """
        path = self.folder / ENTRIES
        if not path.exists():
            return []
        entries = []
        for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
            if not line.strip():
                continue
            entry = _entry(line)
            if entry is None:
                raise LedgerUnreadable(path, number)
            entries.append(entry)
        return entries

    def run_releases(self, run: str) -> list[Release]:
        """The releases already charged to ``run``."""
        return [Release(**line["release"]) for line in self._lines() if line["run"] == run]

    def _stored(self) -> list[Stored]:
        return [
            Stored(Entry("spend", line["epsilon"], line["delta"], at=line["at"]),
                   self._users_of(line["users_sha256"]))
            for line in self._lines()
        ]  # fmt: skip

    def charge(self, run: str, release: Release) -> Charged:
        """Charge ``release`` of ``run`` to every user of the site, or refuse it.

        Raises
        ------
        SiteBudgetError
            When any user of the site would pass the cap, or the run's releases cannot be
            composed as counted; nothing is written then.
        """
        with folder_lock(self.folder):  # two processes on one state folder charge in turn
            return self._charge(run, release)

    def _spent(self) -> tuple[float, float]:
        """The most any user of the site has spent: (epsilon, delta)."""
        groups = standing(self.users, self._stored())
        return max(g.balance.epsilon for g in groups), max(g.balance.delta for g in groups)

    def _binding(self, epsilon: float) -> str:
        """Which cap a refused release passes, without a figure that depends on the data: the
        epsilon cap (the operator's setting), else the delta cap's number of runs."""
        if epsilon > self.max_epsilon * (1 + 1e-9):
            return f"their cap of epsilon {self.max_epsilon:.3g}"
        return f"their delta cap ({RUNS_PER_DELTA_CAP} runs)"

    def _past_cap(self, epsilon: float, delta: float) -> bool:
        return epsilon > self.max_epsilon * (1 + 1e-9) or delta > self.max_delta * (1 + 1e-9)

    def check_run(self, run: str, epsilon: float) -> None:
        """Refuse a run that says it spends ``epsilon`` when its users cannot spend that much
        more (or its delta is past the cap), before anything of it is counted. A run already
        charged is not checked again: its releases are charged one by one.

        Raises
        ------
        SiteBudgetError
        """
        with folder_lock(self.folder):
            if self.run_releases(run):
                return
            eps, delta = self._spent()
        if self._past_cap(eps + epsilon, delta + self.run_delta):
            raise SiteBudgetError(
                f"privacy budget of this site: its users have spent up to epsilon {eps:.3g} of "
                f"{self.max_epsilon:.3g} and delta {delta:.3g} of {self.max_delta:.3g}; this "
                f"run asks epsilon {epsilon:.3g} and delta {self.run_delta:.3g} more: refused "
                "before anything of it was counted",
                public=f"privacy budget of this site: this run asks epsilon {epsilon:.3g} more, "
                f"which would take some of its users past {self._binding(eps + epsilon)}: "
                "refused before anything of it was counted",
            )

    def _charge(self, run: str, release: Release) -> Charged:
        previous = self.run_releases(run)
        cost = charge(previous, release, self.run_delta)
        cost_delta = 0.0 if previous else self.run_delta
        eps, delta = self._spent()
        if self._past_cap(eps + cost, delta + cost_delta):
            raise SiteBudgetError(
                f"privacy budget of this site: its users have spent up to epsilon {eps:.3g} of "
                f"{self.max_epsilon:.3g} and delta {delta:.3g} of {self.max_delta:.3g}; this "
                f"{release.kind} release needs epsilon {cost:.3g}, delta {cost_delta:.3g} more: "
                "refused",
                public=f"privacy budget of this site: this {release.kind} release would take "
                f"some of its users past {self._binding(eps + cost)}: refused",
            )
        line = {
            "run": run,
            "release": asdict(release),
            "epsilon": cost,
            "delta": cost_delta,
            "users_sha256": self._users_sha,
            "at": int(time.time() * 1000),
        }
        append_private(self.folder / ENTRIES, json.dumps(line, allow_nan=False))
        run_eps = sum(e["epsilon"] for e in self._lines() if e["run"] == run)
        return Charged(run_eps, eps + cost, delta + cost_delta)


def _entry(line: bytes) -> dict | None:
    """One ledger line as an entry, or None when it is not a whole one."""
    try:
        entry = json.loads(line)
    except ValueError:  # UnicodeDecodeError included
        return None
    if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
        return None
    try:
        release = Release(**entry["release"])
    except (TypeError, ValueError):  # SiteBudgetError included
        return None
    if release.kind not in get_args(ReleaseKind):  # the accountant would count it as nothing
        return None
    spent = (entry["epsilon"], entry["delta"])
    if not all(_number(x) and x >= 0 for x in spent) or not isinstance(entry["run"], str):
        return None
    if not isinstance(entry["users_sha256"], str) or not _number(entry["at"]):
        return None
    return entry


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
