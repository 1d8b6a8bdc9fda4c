"""`fedrec budget`'s text report: the tightest groups listed, the rest counted (``--json`` lists
them all). The report itself, read from a real ledger, is tested in test_ledger_flow.py."""

from __future__ import annotations

import pytest

from fedrec.cli_budget import GROUPS_SHOWN, _show


def _report(n_groups: int) -> dict:
    groups = [
        {"users": 10 + g, "epsilon": 1.0 + g, "delta": 1e-6, "runs": 1, "cap_epsilon": 10.0,
         "cap_delta": 1e-5, "epsilon_left": 9.0 - g, "delta_left": 9e-6}
        for g in range(n_groups)
    ]  # fmt: skip
    return {"ledger_entries": 1, "store_exists": True, "tracking_uri": "sqlite:///m.db",
            "groups": groups, "users": sum(g["users"] for g in groups), "source": "r.csv",
            "run": None}  # fmt: skip


@pytest.mark.parametrize("n_groups", [1, 5, 6, 9])
def test_the_five_tightest_groups_are_listed_and_the_rest_counted(capsys, n_groups):
    _show(_report(n_groups))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "privacy ledger of sqlite:///m.db: 1 entry"
    listed = [line for line in lines if line.startswith("  ") and "users:" in line]
    assert GROUPS_SHOWN == 5
    assert listed[0] == (
        "  10 users: spent epsilon 1 of 10 and delta 1e-06 of 1e-05 in 1 private run; left: "
        "epsilon 9, delta 9e-06"
    )
    assert len(listed) == min(n_groups, 5)
    more = [line for line in lines if line.startswith("  ... ")]
    expected = [f"  ... {n_groups - 5} more groups with more left (--json)"] if n_groups > 5 else []
    assert more == expected
    assert lines[-1] == "with --dp-epsilon E: whether that run would start"


def test_what_is_left_is_the_cap_less_the_spending_and_never_below_zero():
    from fedrec.cli_budget import _group
    from models.privacy.ledger import Balance, Cap

    left = _group(3, Balance(epsilon=7.5, delta=4e-6, cap=Cap(8.0, 1e-5), spends=2))
    assert (left["epsilon_left"], left["delta_left"]) == (0.5, pytest.approx(6e-6, rel=1e-12))
    # spent past the cap (entries written before caps were stored): nothing left, not negative
    over = _group(3, Balance(epsilon=9.0, delta=2e-5, cap=Cap(8.0, 1e-5), spends=3))
    assert (over["epsilon_left"], over["delta_left"]) == (0.0, 0.0)
    new = _group(4, Balance(epsilon=0.0, delta=0.0, cap=None, spends=0))
    assert (new["cap_epsilon"], new["epsilon_left"], new["delta_left"]) == (None, None, None)


@pytest.mark.parametrize(("refused", "verdict"), [(None, "would start"),
                                                  ("over the cap", "would be refused")])  # fmt: skip
def test_the_asked_run_gets_the_verdict_the_run_itself_would(capsys, refused, verdict):
    caps = [
        {"users": 1, "epsilon": 2.0, "delta": 1e-6},
        {"users": 3, "epsilon": 4.0, "delta": 1e-6},
    ]
    report = _report(1) | {
        "run": {"epsilon": 2.0, "delta": 1e-6, "refused": refused, "stores_caps": caps,
                "warning": None}
    }  # fmt: skip
    _show(report)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3:] == [
        f"a private run of epsilon 2, delta 1e-06: {verdict}",
        "  and store the cap of 1 user without one: epsilon 2, delta 1e-06 (this run alone: "
        "--dp-budget E allows more)",
        "  and store the cap of 3 users without one: epsilon 4, delta 1e-06",
    ]


def test_counts_of_one_are_singular(capsys):
    one = _report(1)
    one["groups"][0] |= {"users": 1, "runs": 1}
    _show(one)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(": 1 entry")
    assert lines[2].startswith("  1 user: ") and lines[2].endswith(" in 1 private run; left: "
                                                                   "epsilon 9, delta 9e-06")  # fmt: skip
    many = _report(1) | {"ledger_entries": 2}
    many["groups"][0] |= {"users": 2, "runs": 2}
    _show(many)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(": 2 entries")
    assert lines[2].startswith("  2 users: ") and " in 2 private runs; " in lines[2]
