"""The privacy ledger's arithmetic: who the users are, what each of them spent, and the cap."""

from __future__ import annotations

import hashlib
import hmac
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from models.data.schema import encode_interactions
from models.privacy.ledger import (
    Balance,
    BudgetError,
    Cap,
    Entry,
    Request,
    Stored,
    balance,
    check_after_writing,
    check_groups_after_writing,
    keyed_fingerprint,
    plan_reservation,
    plan_user_reservation,
    recovered_spend,
    run_delta,
    secret_id,
    standing,
    user_ids,
    user_keys,
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


SECRET = bytes(range(32))


def test_users_are_named_by_their_ids_whatever_their_rows_say():
    base = _data(["u1", "u2", "u3", "u1"], ["a", "b", "c", "d"], [5, 4, 3, 2])
    reordered = _data(["u3", "u1", "u2", "u1"], ["c", "d", "b", "a"], [3, 2, 4, 5], "b.parquet")
    more_rows = _data(["u1", "u2", "u3", "u1", "u2"], ["a", "b", "c", "d", "e"], [1, 4, 3, 2, 5])
    as_numbers = _data([1, 2], ["a", "b"], [5, 4])
    as_text = _data(["1", "2"], ["b", "a"], [1, 1])

    assert user_ids(base).tolist() == ["u1", "u2", "u3"]
    assert user_ids(reordered).tolist() == user_ids(more_rows).tolist() == ["u1", "u2", "u3"]
    assert user_ids(as_numbers).tolist() == user_ids(as_text).tolist() == ["1", "2"]


def test_a_user_key_is_the_truncated_hmac_of_the_id_under_the_secret():
    oracle = sorted(
        int.from_bytes(hmac.new(SECRET, uid.encode(), hashlib.sha256).digest()[:8], "little")
        for uid in ("u1", "u2", "42")
    )

    got = user_keys(["u2", "42", "u1", "u2"], SECRET)

    assert got.dtype == np.uint64 and got.tolist() == oracle
    assert not set(user_keys(["u1"], bytes(32)).tolist()) & set(got.tolist())  # another secret
    assert secret_id(SECRET) != secret_id(bytes(32)) and len(secret_id(SECRET)) == 16
    with pytest.raises(ValueError, match="at least 16"):
        user_keys(["u1"], b"short")


def test_run_delta_defaults_to_one_over_users():
    assert run_delta(None, 400) == 1 / 400 and run_delta(1e-6, 400) == 1e-6
    assert run_delta(1 / 400, 400) == 1 / 400  # the default itself, given
    with pytest.raises(ValueError, match=r"^--dp-delta 0\.5 is above 1 / 400 users \(0\.0025\)"):
        run_delta(0.5, 400)  # accepted before: "(E, 0.5) user-level DP" promises no one
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


def test_a_refusal_names_the_cap_it_passes_with_the_digits_that_show_why():
    """A population that lost a user asks for delta 1/942 against the 1/943 per run its delta
    cap was sized for: to three digits, need and remainder print alike."""
    cap = Cap(6.0, 3 / 943)
    current = Balance(3.0, 2 / 943, cap, 2)

    with pytest.raises(BudgetError) as delta:
        plan_reservation(current, Request(1.0, 1 / 942), at=1, who="1 of these 942 users")
    line = str(delta.value)
    assert line.startswith("privacy budget: 1 of these 942 users has spent epsilon 3 of 6")
    # 1/942 = 0.0010616 needed, 1/943 = 0.0010604 left: four digits tell them apart
    assert "needs epsilon 1, delta 0.001062 more, and their delta cap leaves 0.00106:" in line
    assert "--dp-delta" in line and "--dp-budget-delta" in line

    with pytest.raises(BudgetError) as epsilon:
        plan_reservation(current, Request(3.0001, 1e-6), at=1)
    line = str(epsilon.value)
    assert "needs epsilon 3.0001, delta 1e-06 more, and their epsilon cap leaves 3:" in line
    assert "a smaller --dp-epsilon" in line and "--dp-budget-delta" not in line
    plan_reservation(current, Request(3.0, 1e-6), at=1)  # exactly what is left: it fits


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


# --- per-user balances ----------------------------------------------------------------------

A = np.arange(1, 101, dtype=np.uint64)  # a population of 100 users
B = np.arange(51, 151, dtype=np.uint64)  # half of A, and 50 others


def _apply_stored(stored: list[Stored], writes: list[Stored]) -> list[Stored]:
    return [*stored, *writes]


def _oracle(history: list[tuple[set[int], float, float | None]]) -> dict[int, tuple[float, float]]:
    """Per user: epsilon spent and the latest cap, from (users, epsilon spent, cap set) events."""
    spent: dict[int, float] = {}
    caps: dict[int, float] = {}
    for users, eps, cap in history:
        for u in users:
            spent[u] = spent.get(u, 0.0) + eps
            if cap is not None:
                caps[u] = cap
    return {u: (spent[u], caps[u]) for u in spent}


def test_each_user_keeps_their_own_balance_across_overlapping_populations():
    stored: list[Stored] = []
    runs = [(A, 3.0, 10.0), (B, 4.0, 10.0), (A, 2.0, None), (B, 1.0, None)]
    history = []
    for at, (users, eps, cap) in enumerate(runs, start=1):
        request = Request(eps, 1e-6, cap_epsilon=cap, cap_delta=None if cap is None else 1e-4)
        groups = standing(users, stored)
        writes = plan_user_reservation(groups, request, at=at)
        stored = _apply_stored(stored, writes)
        new_cap = {int(u) for w in writes if w.entry.kind == "cap" for u in w.users}
        history.append(({int(u) for u in users}, eps, None))
        for u in new_cap:  # the cap a user got: the one named, else the run's epsilon
            history.append(({u}, 0.0, cap if cap is not None else eps))

    oracle = _oracle(history)
    everyone = np.union1d(A, B)
    for group in standing(everyone, stored):
        for u in group.members.tolist():
            assert group.balance.epsilon == pytest.approx(oracle[u][0], rel=1e-12)
            assert group.balance.cap.epsilon == oracle[u][1]
    assert {oracle[u] for u in range(1, 51)} == {(5.0, 10.0)}  # A only
    assert {oracle[u] for u in range(51, 101)} == {(10.0, 10.0)}  # both: exactly at the cap
    assert {oracle[u] for u in range(101, 151)} == {(5.0, 10.0)}  # B only


def test_a_run_is_refused_when_any_one_user_would_pass_their_cap():
    first = Request(8.0, 1e-6, cap_epsilon=10.0, cap_delta=1e-4)
    stored = plan_user_reservation(standing(A, []), first, at=1)
    stored += plan_user_reservation(standing(A[:1], stored), Request(2.0, 1e-6), at=2)

    with pytest.raises(BudgetError, match=r"1 of these 100 users has spent epsilon 10 of 10"):
        plan_user_reservation(standing(A, stored), Request(1.0, 1e-6), at=3)
    ok = plan_user_reservation(standing(A[1:], stored), Request(2.0, 1e-6), at=3)  # the rest fit
    assert ok[-1].entry == Entry("spend", 2.0, 1e-6, at=3) and len(ok[-1].users) == 99


def test_adding_or_dropping_users_does_not_reset_anyone():
    stored = plan_user_reservation(standing(A, []), Request(6.0, 1e-6, cap_epsilon=6.0), at=1)
    dummy = np.append(A, np.uint64(10**12))

    for users in (dummy, A[1:], A[::2], np.array([A[0]], dtype=np.uint64)):
        with pytest.raises(BudgetError, match=r"spent epsilon 6 of 6"):
            plan_user_reservation(standing(users, stored), Request(1.0, 1e-6), at=2)
    newcomer = plan_user_reservation(standing(np.array([10**12], np.uint64), stored),
                                     Request(1.0, 1e-6), at=2)  # fmt: skip
    assert [w.entry.kind for w in newcomer] == ["cap", "spend"]  # a new user: their own cap


def test_new_users_get_a_cap_entry_of_their_own_and_old_users_keep_theirs():
    stored = plan_user_reservation(standing(A, []), Request(4.0, 1e-6, cap_epsilon=10.0), at=1)

    writes = plan_user_reservation(standing(B, stored), Request(4.0, 1e-6), at=2)

    caps = [w for w in writes if w.entry.kind == "cap"]
    assert len(caps) == 1 and caps[0].users.tolist() == list(range(101, 151))
    assert caps[0].entry.cap == Cap(4.0, pytest.approx(1e-6))  # B-only users: this run's own
    assert writes[-1].users.tolist() == B.tolist()
    with pytest.raises(BudgetError, match=r"50 of these 100 users' cap is --dp-budget 10"):
        plan_user_reservation(standing(B, stored), Request(1.0, 1e-6, cap_epsilon=4.0), at=2)


def test_entries_that_name_no_users_count_for_everyone():
    legacy = [Stored(Entry("cap", cap=Cap(5.0, 1e-5), at=1), None),
              Stored(Entry("spend", 4.0, 1e-6, at=1), None)]  # fmt: skip

    with pytest.raises(BudgetError, match=r"these users have spent epsilon 4 of 5"):
        plan_user_reservation(standing(B, legacy), Request(2.0, 1e-6), at=2)


def test_the_tightest_group_is_checked_after_writing_and_reported():
    stored = plan_user_reservation(standing(A, []), Request(4.0, 1e-6, cap_epsilon=10.0), at=1)
    stored += plan_user_reservation(standing(B, stored), Request(4.0, 1e-6), at=2)

    groups = standing(np.union1d(A, B), stored)

    assert [len(g.members) for g in groups] == [50, 50, 50]
    assert groups[0].balance.cap.epsilon == 4.0 and groups[0].balance.epsilon == 4.0  # B only
    assert check_groups_after_writing(groups) == groups[0].balance
    stored.append(Stored(Entry("spend", 3.0, 1e-6, at=3), B))
    with pytest.raises(BudgetError, match="concurrent reservation"):
        check_groups_after_writing(standing(B, stored))


def test_groups_come_in_order_of_the_epsilon_their_cap_leaves():
    """Nearly spent under a high cap is tighter than unspent under a low one."""
    spent, fresh = A[:50], A[50:]
    stored = [
        Stored(Entry("cap", cap=Cap(10.0, 1e-4), at=1), spent),
        Stored(Entry("spend", 9.0, 1e-6, at=2), spent),
        Stored(Entry("cap", cap=Cap(5.0, 1e-4), at=3), fresh),
    ]

    groups = standing(A, stored)

    assert [g.headroom() for g in groups] == [1.0, 5.0]
    assert groups[0].members.tolist() == spent.tolist()
    assert check_groups_after_writing(groups) == Balance(9.0, 1e-6, Cap(10.0, 1e-4), 1)


def test_a_keyed_fingerprint_is_the_hmac_of_the_rows_fingerprint_under_the_secret():
    rows = hashlib.sha256(b"some rows").hexdigest()
    oracle = hmac.new(SECRET, b"fedrec dataset fingerprint\n" + rows.encode(), hashlib.sha256)

    keyed = keyed_fingerprint(rows, SECRET)

    assert keyed == oracle.hexdigest() != rows
    assert keyed_fingerprint(rows, bytes(32)) != keyed  # another secret
