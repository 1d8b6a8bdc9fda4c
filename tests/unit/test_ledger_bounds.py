"""The privacy ledger at its edges: one user, float sums that land on the cap, a cap named
again as stored (exactly or up to rounding), the shortest secret and the largest delta allowed,
and the fewest digits a refusal prints."""

from __future__ import annotations

import pytest

from models.privacy.ledger import (
    Balance,
    BudgetError,
    Cap,
    Entry,
    Request,
    balance,
    check_after_writing,
    plan_reservation,
    run_delta,
    user_keys,
)

EMPTY = Balance(0.0, 0.0, None, 0)


def _apply(current: Balance, writes: list[Entry]) -> Balance:
    start = [Entry("cap", cap=current.cap, at=0)] if current.cap is not None else []
    spent = [Entry("spend", current.epsilon, current.delta, at=0)] if current.spends else []
    return balance([*start, *spent, *writes])


def test_one_user_is_enough_for_the_default_delta():
    assert run_delta(None, 1) == 1.0


def test_spends_whose_float_sum_rounds_past_the_cap_still_fit_it():
    assert 0.1 + 0.2 > 0.3  # 0.30000000000000004: the sum of the two runs as floats
    current = _apply(EMPTY, plan_reservation(EMPTY, Request(0.1, 1e-6, cap_epsilon=0.3), at=1))

    writes = plan_reservation(current, Request(0.2, 2e-6), at=2)

    after = _apply(current, writes)
    assert after.epsilon == 0.1 + 0.2 and not after.exceeds_cap()
    with pytest.raises(BudgetError, match="not started"):
        plan_reservation(after, Request(1e-6, 1e-9), at=3)  # anything more does not


@pytest.mark.parametrize("named", [100.0, 100.0 * (1 + 5e-10)])
def test_a_run_may_name_the_stored_cap_again_up_to_rounding(named):
    current = _apply(
        EMPTY, plan_reservation(EMPTY, Request(10.0, 1e-6, cap_epsilon=100.0, cap_delta=1e-5), at=1)
    )

    writes = plan_reservation(current, Request(10.0, 1e-6, cap_epsilon=named, cap_delta=1e-5), at=2)

    assert writes == [Entry("spend", 10.0, 1e-6, at=2)]  # no new cap entry
    assert _apply(current, writes).cap == Cap(100.0, 1e-5)


def test_a_run_naming_a_cap_off_by_a_millionth_is_refused():
    current = _apply(EMPTY, plan_reservation(EMPTY, Request(10.0, 1e-6, cap_epsilon=100.0), at=1))

    with pytest.raises(BudgetError, match=r"cap is --dp-budget 100 \(stored.* asks for 100.0001:"):
        plan_reservation(current, Request(10.0, 1e-6, cap_epsilon=100.0001), at=2)


def test_a_concurrent_overspend_names_what_was_spent_against_the_cap():
    after = Balance(12.0, 2e-6, Cap(10.0, 1e-5), 3)

    with pytest.raises(BudgetError, match=r"reach epsilon 12 of 10, delta 2e-06 of 1e-05"):
        check_after_writing(after)


def test_the_latest_cap_holds_when_spends_come_after_it():
    entries = [
        Entry("cap", cap=Cap(10.0, 1e-5), at=1),
        Entry("spend", 2.0, 1e-6, at=2),
        Entry("cap", cap=Cap(12.0, 2e-5), at=3),
        Entry("spend", 1.0, 1e-6, at=4),
    ]

    got = balance(entries)

    assert got.cap == Cap(12.0, 2e-5) and got.epsilon == 3.0 and got.spends == 2


def test_a_secret_of_16_bytes_is_enough_and_one_of_15_is_refused():
    assert user_keys(["u1", "u2"], bytes(16)).size == 2
    with pytest.raises(ValueError, match="the ledger secret has 15 bytes; at least 16"):
        user_keys(["u1"], bytes(15))


def test_a_delta_above_one_over_users_is_refused_even_below_two_over_users():
    assert run_delta(1 / 400, 400) == 1 / 400
    with pytest.raises(ValueError, match=r"^--dp-delta 0\.00375 is above 1 / 400 users"):
        run_delta(1.5 / 400, 400)


def test_a_refusal_prints_three_digits_when_three_tell_need_and_left_apart():
    current = Balance(7.0, 1e-6, Cap(8.0, 1e-4), 1)  # epsilon 1 left

    with pytest.raises(BudgetError) as refused:
        plan_reservation(current, Request(2.123456, 1e-6), at=1)

    assert "needs epsilon 2.12, delta 1e-06 more, and their epsilon cap leaves 1:" in str(
        refused.value
    )
