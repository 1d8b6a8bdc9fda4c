"""The privacy ledger's arithmetic: who the users are, what they spent, and the cap."""

from __future__ import annotations

from fractions import Fraction

import pandas as pd
import pytest

from models.data.schema import encode_interactions
from models.privacy.ledger import (
    Balance,
    BudgetError,
    Cap,
    Entry,
    Request,
    balance,
    check_after_writing,
    plan_reservation,
    recovered_spend,
    run_delta,
    users_fingerprint,
)

EMPTY = Balance(0.0, 0.0, None, 0)


def _data(users, items, ratings, source="a.csv"):
    frame = pd.DataFrame({"user": users, "item": items, "rating": ratings})
    return encode_interactions(frame, rating_scale=(1.0, 5.0), source=source)


def _after(current: Balance, writes: list[Entry]) -> Balance:
    """Apply the planned entries to a balance the way the store would read them back."""
    start = [Entry("cap", cap=current.cap, at=0)] if current.cap is not None else []
    spent = [Entry("spend", current.epsilon, current.delta, at=0)] if current.spends else []
    return balance([*start, *spent, *writes])


def test_the_same_users_are_one_population_whatever_their_rows_say():
    base = _data(["u1", "u2", "u3", "u1"], ["a", "b", "c", "d"], [5, 4, 3, 2])

    reordered = _data(["u3", "u1", "u2", "u1"], ["c", "d", "b", "a"], [3, 2, 4, 5], "b.parquet")
    more_rows = _data(["u1", "u2", "u3", "u1", "u2"], ["a", "b", "c", "d", "e"], [1, 4, 3, 2, 5])
    one_more_user = _data(["u1", "u2", "u3", "u4"], ["a", "b", "c", "d"], [5, 4, 3, 2])
    as_numbers = _data([1, 2], ["a", "b"], [5, 4])
    as_text = _data(["1", "2"], ["b", "a"], [1, 1])

    assert users_fingerprint(reordered) == users_fingerprint(base)
    assert users_fingerprint(more_rows) == users_fingerprint(base)
    assert users_fingerprint(one_more_user) != users_fingerprint(base)
    assert users_fingerprint(as_numbers) == users_fingerprint(as_text)
    assert len(users_fingerprint(base)) == 64


def test_run_delta_defaults_to_one_over_users():
    assert run_delta(None, 400) == 1 / 400 and run_delta(1e-6, 400) == 1e-6
    with pytest.raises(ValueError, match="n_users == 0"):
        run_delta(None, 0)


def test_the_balance_adds_every_spend_and_keeps_the_latest_cap():
    spends = [(0.1, 1e-6), (0.2, 2e-6), (2.7, 1e-7)]
    entries = [
        Entry("cap", cap=Cap(10, 1e-5), at=1),
        *(Entry("spend", e, d, at=2 + i) for i, (e, d) in enumerate(spends)),
        Entry("cap", cap=Cap(20, 2e-5), at=9),
    ]

    got = balance(reversed(entries))

    oracle_eps = sum(Fraction(e) for e, _ in spends)
    oracle_delta = sum(Fraction(d) for _, d in spends)
    assert got.epsilon == pytest.approx(float(oracle_eps), rel=1e-15)
    assert got.delta == pytest.approx(float(oracle_delta), rel=1e-15)
    assert got.cap == Cap(20, 2e-5) and got.spends == 3
    assert balance([]) == EMPTY


def test_first_use_stores_the_runs_own_epsilon_and_delta_as_the_cap():
    writes = plan_reservation(EMPTY, Request(8.0, 1e-4), at=5)

    assert writes == [Entry("cap", cap=Cap(8.0, 1e-4), at=5), Entry("spend", 8.0, 1e-4, at=5)]
    with pytest.raises(BudgetError, match=r"spent epsilon 8 of 8 and delta 0\.0001 of 0\.0001"):
        plan_reservation(_after(EMPTY, writes), Request(8.0, 1e-4), at=6)


def test_a_cap_named_at_first_use_is_enforced_when_later_runs_omit_it():
    first = plan_reservation(EMPTY, Request(4.0, 1e-5, cap_epsilon=10.0, cap_delta=1e-4), at=1)
    current = _after(EMPTY, first)
    second = plan_reservation(current, Request(4.0, 1e-5), at=2)  # cap omitted: the stored one
    current = _after(current, second)

    assert second == [Entry("spend", 4.0, 1e-5, at=2)]
    assert current.epsilon == 8.0 and current.cap == Cap(10.0, 1e-4)
    with pytest.raises(BudgetError, match=r"spent epsilon 8 of 10.*needs epsilon 4"):
        plan_reservation(current, Request(4.0, 1e-5), at=3)
    plan_reservation(current, Request(2.0, 1e-5), at=3)  # exactly up to the cap fits


def test_an_omitted_delta_cap_allows_as_many_runs_as_the_epsilon_cap():
    writes = plan_reservation(EMPTY, Request(2.0, 1e-5, cap_epsilon=6.0), at=1)
    current = _after(EMPTY, writes)
    for at in (2, 3):
        current = _after(current, plan_reservation(current, Request(2.0, 1e-5), at=at))

    assert writes[0].cap == Cap(6.0, pytest.approx(3e-5))
    assert current.epsilon == 6.0 and current.delta == pytest.approx(3e-5)
    with pytest.raises(BudgetError, match="spent epsilon 6 of 6"):
        plan_reservation(current, Request(0.5, 1e-6), at=4)


def test_delta_accumulates_too():
    current = _after(EMPTY, plan_reservation(EMPTY, Request(1.0, 4e-5, 10.0, 1e-4), at=1))
    current = _after(current, plan_reservation(current, Request(1.0, 4e-5), at=2))

    with pytest.raises(BudgetError, match=r"delta 8e-05 of 0\.0001"):
        plan_reservation(current, Request(1.0, 4e-5), at=3)  # epsilon fits, delta does not


def test_a_run_cannot_name_another_cap_without_the_operators_flag():
    current = Balance(8.0, 1e-5, Cap(10.0, 1e-4), 1)

    with pytest.raises(BudgetError, match=r"cap is --dp-budget 10 .* asks for 100"):
        plan_reservation(current, Request(8.0, 1e-5, cap_epsilon=100.0), at=2)
    with pytest.raises(BudgetError, match=r"--dp-budget-delta 0\.0001 .* asks for 0\.5"):
        plan_reservation(current, Request(1.0, 1e-5, cap_delta=0.5), at=2)
    writes = plan_reservation(current, Request(8.0, 1e-5, cap_epsilon=20.0, set_cap=True), at=2)

    assert writes[0] == Entry("cap", cap=Cap(20.0, 2.5e-5), at=2)  # delta: 20 / 8 runs' worth
    assert _after(current, writes).epsilon == 16.0
    with pytest.raises(BudgetError, match="needs --dp-budget"):
        plan_reservation(current, Request(1.0, 1e-5, set_cap=True), at=3)


def test_a_balance_past_its_cap_after_writing_is_refused():
    check_after_writing(Balance(10.0, 1e-4, Cap(10.0, 1e-4), 2))
    check_after_writing(Balance(99.0, 0.5, None, 9))

    with pytest.raises(BudgetError, match="concurrent reservation"):
        check_after_writing(Balance(12.0, 1e-5, Cap(10.0, 1e-4), 2))


def test_recovered_spending_sums_the_versions_epsilons():
    entry = recovered_spend([8.0, 4.0, 0.5], 1e-4, at=3)

    assert (entry.kind, entry.epsilon, entry.at) == ("spend", 12.5, 3)
    assert entry.delta == pytest.approx(3e-4, rel=1e-12)
