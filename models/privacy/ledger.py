"""The privacy budget ledger: what one population of users has spent in (epsilon, delta) across
training runs, and the cap it may not pass.

The same users are trained again and again (every night, under several model names), so their
privacy loss adds up. The ledger is an append-only list of entries about one population:

- a **spend** entry per private run, written before the run trains: its (epsilon, delta), the
  whole run's: the training rounds and the final evaluation's releases (the model's, and the
  champion's when there is one) are calibrated to compose to that epsilon together;
- a **cap** entry, written at the population's first private run (the cap given then, else that
  run's own epsilon and delta) and again only when an operator sets a new cap explicitly.

The balance is the sum of every spend entry (basic composition: k runs that are each
(eps_i, delta_i)-DP are (sum eps_i, sum delta_i)-DP together, with no assumption about how the
runs relate; an advanced composition or a shared RDP accountant across runs would be tighter).
A run starts only if the balance plus its own (epsilon, delta) stays within the cap. A reservation
that is refused after its entry was written (a concurrent reservation took the rest) stays
counted: the ledger may over-count, never under-count.

The population is named by :func:`users_fingerprint`, a hash of the set of user ids, not by a
file path, a spelling of the inputs or a model name: the same users read from a renamed file,
from ``--train/--test`` files or for a new model hit the same ledger, and so do new ratings of
the same users. A population that gains or loses a user is a new population with its own ledger
(the limit of keying by content; see the README).

Everything here is pure; reading and writing the entries (an MLflow experiment) lives in
``tasks/tracking.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from models.data.schema import USER, Interactions

# Relative slack when comparing sums of floats with a cap (8 + 2 == 10 must fit a cap of 10).
_SLACK = 1e-9


class BudgetError(ValueError):
    """A private run that the ledger does not allow to start; the message is one line."""


def users_fingerprint(data: Interactions) -> str:
    """SHA-256 of the sorted, distinct ids (as text) of the users that have rows in ``data``.

    Parameters
    ----------
    data : Interactions
        The run's validated interactions (all splits together).

    Returns
    -------
    str
        64 hex digits; independent of row order, file names, ratings and timestamps.
    """
    present = np.unique(data.frame[USER].to_numpy())
    ids = np.unique(np.asarray(data.user_ids[present]).astype(str))
    return hashlib.sha256("\n".join(ids.tolist()).encode()).hexdigest()


def run_delta(dp_delta: float | None, n_users: int) -> float:
    """The run's delta: the one asked for, else 1 / users (the training's own default)."""
    if dp_delta is not None:
        return dp_delta
    if n_users < 1:
        raise ValueError(f"n_users == {n_users}: a private run needs at least one user")
    return 1.0 / n_users


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


def plan_reservation(current: Balance, request: Request, *, at: int) -> list[Entry]:
    """The entries to append for ``request`` (a cap entry when one is stored now, then the spend).

    Parameters
    ----------
    current : Balance
        The population's balance before this run.
    request : Request
    at : int
        Time stamp of the new entries.

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
                    f"privacy ledger: these users' cap is {name} {_exact(kept)} (stored at their first "
                    f"private run); this run asks for {_exact(asked)}: not started (omit it, or an "
                    "operator sets a new cap with --dp-ledger-set-cap)"
                )
    after = Balance(
        current.epsilon + request.epsilon, current.delta + request.delta, cap, current.spends + 1
    )
    if after.exceeds_cap():
        raise BudgetError(
            f"privacy budget: these users have spent epsilon {current.epsilon:.3g} of "
            f"{cap.epsilon:.3g} and delta {current.delta:.3g} of {cap.delta:.3g}; this run needs "
            f"epsilon {request.epsilon:.3g}, delta {request.delta:.3g} more: not started"
        )
    return [*writes, Entry("spend", request.epsilon, request.delta, at=at)]


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
