"""The privacy budget ledger: what each user has spent in (epsilon, delta) across training runs,
and the cap no user may pass.

The same users are trained again and again (every night, under several model names), so their
privacy loss adds up. The ledger is an append-only list of entries, each about a set of users:

- a **spend** entry per private run, written before the run trains, covering the run's users:
  its (epsilon, delta), the whole run's: the training rounds and the final evaluation's releases
  (the model's, and the champion's when there is one) are calibrated to compose to that epsilon
  together;
- a **cap** entry, written for the users who have none yet at their first private run (the cap
  given then, else that run's own epsilon and delta), and for every user of a run in which an
  operator sets a new cap explicitly.

A user's balance is the sum of the spend entries that cover them (basic composition: k runs
that are each (eps_i, delta_i)-DP are (sum eps_i, sum delta_i)-DP together, with no assumption
about how the runs relate; an advanced composition or a shared RDP accountant across runs would
be tighter); their cap is the latest cap entry that covers them. A run starts only if every one
of its users stays within their cap. Because the balance is per user, a run cannot reset it by
changing who else takes part: adding a made-up user, dropping one, renaming the file, splitting
it into ``--train/--test`` or training under a new model name all leave each user's history as it
was. A reservation that is refused after its entry was written (a concurrent reservation took the
rest) stays counted: the ledger may over-count, never under-count.

Users are named by :func:`user_keys`: a keyed hash (HMAC-SHA-256, truncated to 64 bits) of their
id under a secret that lives with the coordinator, never in the tracking store. Readers of the
store see, per entry, how many users it covers and which entries share users, not who they are
(user ids are short, so an unkeyed hash would be reversed by trying every id). Two distinct users
whose keys collide are counted as one: an over-count, never an under-count. Entries written
without a set of users (by an earlier, per-population ledger) count for every user.

Everything here is pure; reading and writing the entries (an MLflow experiment) and the secret
live in ``tasks/tracking.py``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from models.data.schema import USER, Interactions

# Relative slack when comparing sums of floats with a cap (8 + 2 == 10 must fit a cap of 10).
_SLACK = 1e-9


class BudgetError(ValueError):
    """A private run that the ledger does not allow to start; the message is one line."""

    one_line = True  # the command line shows the message alone (exit 2: running it again fails)


def user_ids(data: Interactions) -> np.ndarray:
    """The distinct ids (as text) of the users that have rows in ``data``."""
    present = np.unique(data.frame[USER].to_numpy())
    return np.unique(np.asarray(data.user_ids[present]).astype(str))


USER_KEY = np.dtype("<u8")  # the stored form of a user key: 8 bytes, little-endian


def user_keys(ids: Iterable[str], secret: bytes) -> np.ndarray:
    """The ledger's names for users: HMAC-SHA-256 of each id (as text) under ``secret``,
    truncated to 64 bits; sorted, distinct.

    Parameters
    ----------
    ids : iterable of str
        User ids (:func:`user_ids`).
    secret : bytes
        The ledger's secret (at least 16 bytes).

    Returns
    -------
    numpy.ndarray
        ``uint64`` keys.
    """
    if len(secret) < 16:
        raise ValueError(f"the ledger secret has {len(secret)} bytes; at least 16 are needed")
    digests = b"".join(hmac.new(secret, str(i).encode(), hashlib.sha256).digest()[:8] for i in ids)
    return np.unique(np.frombuffer(digests, dtype=USER_KEY).astype(np.uint64))


def keyed_fingerprint(fingerprint: str, secret: bytes) -> str:
    """A dataset fingerprint keyed with a secret (HMAC-SHA-256 of the rows' own fingerprint):
    it still tells whether the data changed, to whoever holds the secret, while someone who
    knows every row but one user's cannot test guesses of that user's rows against it, as
    against the plain SHA-256. A private run's logged fingerprint (the ledger's secret) and a
    site's enrolment fingerprint (the site's own secret)."""
    message = b"fedrec dataset fingerprint\n" + fingerprint.encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def secret_id(secret: bytes) -> str:
    """A public name of a ledger secret (16 hex digits): entries record which secret named their
    users, so a run holding another secret is refused instead of finding no history."""
    return hmac.new(secret, b"fedrec privacy ledger secret id", hashlib.sha256).hexdigest()[:16]


class DeltaAboveOneUser(ValueError):
    """A delta above 1 / users: no guarantee for every user (one line, the user's to fix)."""

    one_line = True


def run_delta(dp_delta: float | None, n_users: int) -> float:
    """The run's delta: the one asked for, else 1 / users (the training's own default).

    Raises
    ------
    DeltaAboveOneUser
        For a delta above 1 / users: a mechanism allowed to fail with that probability may
        release one user's rows whole, so (epsilon, delta) would promise no one anything.
    """
    if n_users < 1:
        raise ValueError(f"n_users == {n_users}: a private run needs at least one user")
    if dp_delta is not None and dp_delta > 1.0 / n_users:
        raise DeltaAboveOneUser(
            f"--dp-delta {dp_delta:g} is above 1 / {n_users} users ({1.0 / n_users:.3g}): with "
            "that probability a release may expose one user's rows whole, so the guarantee "
            "would hold for no one; allowed: a delta of at most 1 / users (the default), "
            "usually far below it"
        )
    return 1.0 / n_users if dp_delta is None else dp_delta


@dataclass(frozen=True)
class Cap:
    """The most (epsilon, delta) a population may spend in total."""

    epsilon: float
    delta: float


@dataclass(frozen=True)
class Entry:
    """One ledger entry. ``at`` orders entries (milliseconds); ``cap`` is set on cap entries."""

    kind: Literal["spend", "cap"]
    epsilon: float = 0.0
    delta: float = 0.0
    cap: Cap | None = None
    at: int = 0


@dataclass(frozen=True)
class Balance:
    """What a population has spent, and its cap (None before its first private run)."""

    epsilon: float
    delta: float
    cap: Cap | None
    spends: int

    def exceeds_cap(self) -> bool:
        """True when the spending is past the cap (never true without a cap)."""
        return self.cap is not None and not (
            _within(self.epsilon, self.cap.epsilon) and _within(self.delta, self.cap.delta)
        )

    def describe(self) -> str:
        cap = "no cap" if self.cap is None else f"of {self.cap.epsilon:.3g}"
        cap_delta = "" if self.cap is None else f" of {self.cap.delta:.3g}"
        return f"epsilon {self.epsilon:.3g} {cap}, delta {self.delta:.3g}{cap_delta}"


def _within(value: float, limit: float) -> bool:
    return value <= limit * (1 + _SLACK) + 1e-15


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= _SLACK * max(abs(a), abs(b))


def balance(entries: Iterable[Entry]) -> Balance:
    """The sum of the spend entries and the latest cap entry.

    Parameters
    ----------
    entries : iterable of Entry
        Every entry of one population, in any order.

    Returns
    -------
    Balance
    """
    ordered = sorted(entries, key=lambda e: e.at)
    spends = [e for e in ordered if e.kind == "spend"]
    caps = [e.cap for e in ordered if e.kind == "cap" and e.cap is not None]
    return Balance(
        float(sum(e.epsilon for e in spends)),
        float(sum(e.delta for e in spends)),
        caps[-1] if caps else None,
        len(spends),
    )


@dataclass(frozen=True)
class Request:
    """A private run asking to spend ``(epsilon, delta)``.

    ``cap_epsilon``/``cap_delta`` are the cap the run names (None: the stored one; at first
    use, this run's epsilon, and ``delta * cap_epsilon / epsilon``, so the delta cap allows as
    many runs like this one as the epsilon cap does); ``set_cap`` is the operator's explicit
    request to store them as the new cap.
    """

    epsilon: float
    delta: float
    cap_epsilon: float | None = None
    cap_delta: float | None = None
    set_cap: bool = False


def _exact(value: float) -> str:
    """A cap as written, to the last digit that tells two caps apart (100, 100.0001, 1e-05)."""
    return repr(float(value)).removesuffix(".0")


def plan_reservation(
    current: Balance, request: Request, *, at: int, who: str = "these users"
) -> list[Entry]:
    """The entries to append for ``request`` (a cap entry when one is stored now, then the spend).

    Parameters
    ----------
    current : Balance
        The population's balance before this run.
    request : Request
    at : int
        Time stamp of the new entries.
    who : str
        Who the balance is of, as refusals name them.

    Returns
    -------
    list of Entry

    Raises
    ------
    BudgetError
        When the run names a cap other than the stored one without ``set_cap``, when ``set_cap``
        names no epsilon cap, or when the run's spending would pass the cap.
    """
    stored, writes = current.cap, []
    if request.set_cap or stored is None:
        if request.set_cap and request.cap_epsilon is None:
            raise BudgetError("privacy ledger: setting the cap needs --dp-budget (an epsilon)")
        cap_epsilon = request.cap_epsilon if request.cap_epsilon is not None else request.epsilon
        # An omitted delta cap allows as many runs like this one as the epsilon cap does.
        cap_delta = request.cap_delta
        if cap_delta is None:
            cap_delta = request.delta * cap_epsilon / request.epsilon
        cap = Cap(cap_epsilon, cap_delta)
        writes.append(Entry("cap", cap=cap, at=at))
    else:
        cap = stored
        for name, asked, kept in (
            ("--dp-budget", request.cap_epsilon, stored.epsilon),
            ("--dp-budget-delta", request.cap_delta, stored.delta),
        ):
            if asked is not None and not _same(asked, kept):
                raise BudgetError(
                    f"privacy ledger: {who}' cap is {name} {_exact(kept)} (stored at their first "
                    f"private run); this run asks for {_exact(asked)}: not started (omit it, or an "
                    "operator sets a new cap with --dp-ledger-set-cap)"
                )
    after = Balance(
        current.epsilon + request.epsilon, current.delta + request.delta, cap, current.spends + 1
    )
    if after.exceeds_cap():
        raise BudgetError(_refusal(current, request, cap, who))
    return [*writes, Entry("spend", request.epsilon, request.delta, at=at)]


def _refusal(current: Balance, request: Request, cap: Cap, who: str) -> str:
    """Why a run is refused: what the users spent, what the run needs, which cap it would pass
    and what that cap leaves (to as many digits as tell the two apart), and what to change."""
    over_epsilon = not _within(current.epsilon + request.epsilon, cap.epsilon)
    name, need, left = (
        ("epsilon", request.epsilon, cap.epsilon - current.epsilon)
        if over_epsilon
        else ("delta", request.delta, cap.delta - current.delta)
    )
    digits = next((d for d in range(3, 17) if f"{need:.{d}g}" != f"{left:.{d}g}"), 17)
    asked = {"epsilon": f"{request.epsilon:.3g}", "delta": f"{request.delta:.3g}"}
    asked[name] = f"{need:.{digits}g}"
    fix = (
        "a smaller --dp-epsilon, or an operator stores a higher cap: --dp-budget E "
        "--dp-ledger-set-cap"
        if over_epsilon
        else "a smaller --dp-delta, or an operator stores a higher cap: --dp-budget E "
        "--dp-budget-delta D --dp-ledger-set-cap"
    )
    verb = "has" if who.startswith("1 of ") else "have"
    return (
        f"privacy budget: {who} {verb} spent epsilon {current.epsilon:.3g} of {cap.epsilon:.3g} "
        f"and delta {current.delta:.3g} of {cap.delta:.3g}; this run needs epsilon "
        f"{asked['epsilon']}, delta {asked['delta']} more, and their {name} cap leaves "
        f"{max(0.0, left):.{digits}g}: not started (what was spent stays spent; {fix})"
    )


@dataclass(frozen=True)
class Stored:
    """One entry as the store holds it: the entry and the keys of the users it covers (None:
    every user, as entries written before the ledger named users)."""

    entry: Entry
    users: np.ndarray | None


@dataclass(frozen=True)
class Group:
    """Users of a run who share one history: the same entries cover each of them."""

    members: np.ndarray
    balance: Balance

    def headroom(self) -> float:
        """Epsilon left under the cap (infinite without one)."""
        cap = self.balance.cap
        return float("inf") if cap is None else cap.epsilon - self.balance.epsilon


def standing(users: np.ndarray, stored: Sequence[Stored]) -> list[Group]:
    """The run's users grouped by history, each group with its balance, tightest first.

    Parameters
    ----------
    users : numpy.ndarray
        The run's user keys (:func:`user_keys`).
    stored : sequence of Stored
        Every entry of the ledger.

    Returns
    -------
    list of Group
        Groups partitioning ``users``, in increasing order of headroom.
    """
    users = np.unique(np.asarray(users, dtype=np.uint64))
    if len(users) == 0:
        raise ValueError("a private run needs at least one user")
    if not stored:
        return [Group(users, balance([]))]
    covers = np.stack(
        [np.ones(len(users), bool) if s.users is None else np.isin(users, s.users) for s in stored],
        axis=1,
    )
    patterns, inverse = np.unique(covers, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    groups = [
        Group(
            users[inverse == g], balance(s.entry for s, c in zip(stored, pattern, strict=True) if c)
        )
        for g, pattern in enumerate(patterns)
    ]
    return sorted(groups, key=Group.headroom)


def _who(group: Group, n_users: int) -> str:
    n = len(group.members)
    return "these users" if n == n_users else f"{n} of these {n_users} users"


def plan_user_reservation(groups: Sequence[Group], request: Request, *, at: int) -> list[Stored]:
    """The entries to append for ``request`` over the run's users: one cap entry per new cap
    (covering the users it applies to), then one spend entry covering every user.

    Each group is judged as :func:`plan_reservation` judges one population, tightest first, so a
    refusal names the users closest to their cap.

    Raises
    ------
    BudgetError
        When any group refuses the run.
    """
    n_users = sum(len(g.members) for g in groups)
    caps: dict[Cap, list[np.ndarray]] = {}
    for group in groups:
        planned = plan_reservation(group.balance, request, at=at, who=_who(group, n_users))
        for entry in planned[:-1]:
            assert entry.cap is not None
            caps.setdefault(entry.cap, []).append(group.members)
    everyone = np.sort(np.concatenate([g.members for g in groups]))
    return [
        *(
            Stored(Entry("cap", cap=cap, at=at), np.sort(np.concatenate(m)))
            for cap, m in caps.items()
        ),
        Stored(Entry("spend", request.epsilon, request.delta, at=at), everyone),
    ]


def check_groups_after_writing(groups: Sequence[Group]) -> Balance:
    """:func:`check_after_writing` for every group; returns the tightest group's balance."""
    for group in groups:
        check_after_writing(group.balance)
    return groups[0].balance


def check_after_writing(after: Balance) -> None:
    """Refuse when the balance read back after writing passes the cap: another reservation
    was written at the same time (possible with a remote store, where no lock serialises runs).

    Raises
    ------
    BudgetError
        When ``after`` exceeds its cap; the entry just written stays counted.
    """
    if after.exceeds_cap():
        raise BudgetError(
            f"privacy budget: a concurrent reservation for these users was written at the same "
            f"time; together they reach {after.describe()}: not started (this reservation stays "
            "counted)"
        )


def recovered_spend(epsilons: Iterable[float], delta_each: float, *, at: int) -> Entry:
    """One spend entry for private runs that happened without a ledger entry (e.g. the model's
    private versions found after the ledger was lost): their epsilons summed, and ``delta_each``
    for each of them (their deltas were not recorded)."""
    values = [float(e) for e in epsilons]
    return Entry("spend", float(sum(values)), delta_each * len(values), at=at)
