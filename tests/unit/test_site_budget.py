"""A site's own privacy accountant: what a release costs, the cap across runs, per user, kept on
the site's disk, and a coordinator that under-states the noise."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest

from fedrec.sites.budget import ENTRIES, SiteBudget
from models.privacy.dp import UserLevelDP, calibrate
from models.privacy.released_metrics import MetricRelease
from models.sites.budget import (
    Release,
    SiteBudgetError,
    charge,
    evaluation_release,
    run_epsilon,
    training_release,
)

# Long ids, so that finding one in the budget's files cannot happen by chance in its random bytes.
USERS = np.array([f"site-user-{i:05d}" for i in range(200)])


def _rdp_epsilon(sigma: float, q: float, rounds: int, extra: list[float], delta: float) -> float:
    """An independent upper bound: dp-accounting's RDP accountant on the same composition."""
    accountant = dp_accounting.rdp.RdpAccountant(
        [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    )
    sampled = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(sampled, rounds))
    for s in extra:
        accountant.compose(dp_accounting.GaussianDpEvent(s))
    return accountant.get_epsilon(delta)


def test_a_training_answer_is_accounted_with_the_sites_own_noise_share():
    dp = UserLevelDP(2.0, shares=4)

    assert training_release(dp, None) == Release("full", 1.0)  # 2 / sqrt(4), every user
    assert training_release(dp, 0.25) == Release("round", 1.0, 0.25)
    assert training_release(dp, 1.0) == Release("full", 1.0)
    assert evaluation_release(MetricRelease(7.0)) == Release("evaluation", 7.0)
    with pytest.raises(SiteBudgetError, match=r"sampling rate 1\.5"):
        Release("round", 1.0, 1.5)
    with pytest.raises(SiteBudgetError, match="noise multiplier nan"):
        Release("full", math.nan)


@pytest.mark.parametrize(
    ("noise_multiplier", "sampling_rate", "reason"),
    [
        (0.0, 1.0, "noise multiplier 0.0 is not a positive number"),  # no noise: no guarantee
        (-1.0, 1.0, "noise multiplier -1.0 is not a positive number"),
        (math.inf, 1.0, "noise multiplier inf is not a positive number"),
        (1.0, 0.0, r"sampling rate 0\.0 is outside \(0, 1\]"),  # a release of nobody
        (1.0, -0.5, r"sampling rate -0\.5 is outside"),
    ],
)
def test_a_release_without_noise_or_with_no_sampled_users_is_refused(
    noise_multiplier, sampling_rate, reason
):
    with pytest.raises(SiteBudgetError, match=reason):
        Release("round", noise_multiplier, sampling_rate)


def test_a_site_budget_needs_a_positive_cap(tmp_path):
    for cap in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match=f"max_epsilon={cap} must be > 0"):
            SiteBudget(tmp_path / "budget", USERS, max_epsilon=cap)
    assert SiteBudget(tmp_path / "budget", USERS, max_epsilon=0.5).max_epsilon == 0.5


def test_a_cap_of_exactly_two_charges_allows_two_and_refuses_the_third(tmp_path):
    release = Release("full", 2.0)
    cost = run_epsilon([release], 1e-3 / 10)  # at the run delta of max_delta=1e-3
    capped = SiteBudget(tmp_path, USERS, max_epsilon=2 * cost, max_delta=1e-3)

    capped.charge("run-1", release)
    assert capped.charge("run-2", release).epsilon == 2 * cost  # the cap itself is allowed
    with pytest.raises(SiteBudgetError) as refused:
        capped.charge("run-3", release)
    # the site's own line names what its users spent and what the release needs; the line it
    # may post names the cap that binds and no figure computed with its delta
    assert str(refused.value) == (
        f"privacy budget of this site: its users have spent up to epsilon {2 * cost:.3g} of "
        f"{2 * cost:.3g} and delta 0.0002 of 0.001; this full release needs epsilon {cost:.3g}, "
        "delta 0.0001 more: refused"
    )
    assert refused.value.public == (
        "privacy budget of this site: this full release would take some of its users past "
        f"their cap of epsilon {2 * cost:.3g}: refused"
    )


def test_the_delta_cap_allows_its_number_of_runs_and_no_more(tmp_path):
    release = Release("full", 100.0)  # next to no epsilon: only delta binds
    budget = SiteBudget(tmp_path, USERS, max_epsilon=100.0, max_delta=1e-3)
    for run in range(10):  # RUNS_PER_DELTA_CAP, each at max_delta / 10
        spent = budget.charge(f"run-{run}", release)
    assert spent.delta == pytest.approx(1e-3)
    with pytest.raises(SiteBudgetError, match=r"delta 0\.001 of 0\.001.*refused") as refused:
        budget.charge("run-10", release)
    assert refused.value.public == (
        "privacy budget of this site: this full release would take some of its users past "
        "their delta cap (10 runs): refused"
    )
    # and an eleventh run is refused at its enrolment, before its noisy count is charged
    with pytest.raises(SiteBudgetError) as refused:
        budget.check_run("run-10", 0.001)
    assert refused.value.public == (
        "privacy budget of this site: this run asks epsilon 0.001 more, which would take some "
        "of its users past their delta cap (10 runs): refused before anything of it was counted"
    )
    budget.check_run("run-9", 0.001)  # a run already charged is not checked again


def test_a_run_calibrated_at_the_sites_run_delta_is_counted_by_a_default_site_as_its_epsilon(
    tmp_path,
):
    """The coordinator of a run over real sites calibrates its noise at ``SITE_RUN_DELTA``;
    a site with the default cap counts each run at its own per-run delta. They must be one
    number, or a site counts a run of epsilon 8 as more (or less) than 8."""
    from models.sites.budget import SITE_RUN_DELTA

    budget = SiteBudget(tmp_path, USERS, max_epsilon=10.0)
    assert budget.run_delta == SITE_RUN_DELTA == pytest.approx(1e-7)
    sigma = calibrate(8.0, 1.0, 5, SITE_RUN_DELTA, relative=(4.0,))
    for _ in range(5):
        budget.charge("run", Release("full", sigma))
    spent = budget.charge("run", evaluation_release(MetricRelease(4.0 * sigma)))
    assert 7.99 < spent.run_epsilon <= 8.0 + 1e-6


def test_a_charge_reports_the_delta_its_users_have_spent(tmp_path):
    budget = SiteBudget(tmp_path, USERS, max_epsilon=50.0, max_delta=1e-3)
    release = Release("full", 2.0)

    first = budget.charge("run-1", release)
    same_run = budget.charge("run-1", release)  # a run pays its delta once
    next_run = budget.charge("run-2", release)

    assert first.delta == pytest.approx(1e-4)
    assert same_run.delta == pytest.approx(1e-4)
    assert next_run.delta == pytest.approx(2e-4)


def test_the_charges_of_a_run_add_up_to_its_composed_epsilon():
    releases = [Release("round", 1.1, 0.3)] * 12 + [Release("evaluation", 6.0)] * 2
    delta = 1e-5

    charges = [charge(releases[:i], r, delta) for i, r in enumerate(releases)]

    total = run_epsilon(releases, delta)
    assert sum(charges) == pytest.approx(total, rel=1e-12)
    assert all(c > 0 for c in charges)
    assert total <= _rdp_epsilon(1.1, 0.3, 12, [6.0, 6.0], delta) * (1 + 1e-9)
    assert total > _rdp_epsilon(1.1, 0.3, 12, [6.0, 6.0], delta) * 0.5  # same order: not zero


def test_a_run_that_changes_its_noise_after_its_first_release_is_not_accounted():
    with pytest.raises(SiteBudgetError, match="changed its training noise"):
        run_epsilon([Release("round", 1.0, 0.3), Release("round", 0.5, 0.3)], 1e-5)
    with pytest.raises(SiteBudgetError, match="sampling rates"):
        run_epsilon([Release("round", 1.0, 0.3), Release("round", 1.0, 0.6)], 1e-5)


def test_the_cap_holds_across_runs_and_restarts_and_a_refusal_writes_nothing(tmp_path):
    budget = SiteBudget(tmp_path / "budget", USERS, max_epsilon=6.0)
    release = Release("full", 2.0)

    first = budget.charge("run-1", release)
    again = SiteBudget(tmp_path / "budget", USERS, max_epsilon=6.0)  # a restarted site
    second = again.charge("run-2", release)
    lines = (tmp_path / "budget" / ENTRIES).read_text().splitlines()

    assert first.run_epsilon == pytest.approx(run_epsilon([release], budget.run_delta))
    assert second.epsilon == pytest.approx(2 * first.epsilon)
    with pytest.raises(SiteBudgetError, match=r"spent up to epsilon .* of 6 .*: refused"):
        again.charge("run-3", release)
    assert (tmp_path / "budget" / ENTRIES).read_text().splitlines() == lines
    assert budget.run_delta == pytest.approx(1e-6 / 10)  # the default cap, not 1 / users
    assert oct((tmp_path / "budget" / ENTRIES).stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "budget").stat().st_mode & 0o777) == "0o700"
    stored = b"".join(p.read_bytes() for p in (tmp_path / "budget").iterdir())
    assert not any(user.encode() in stored for user in USERS)


def test_users_who_join_the_site_later_carry_only_what_they_spent(tmp_path):
    release = Release("full", 2.0)
    cost = run_epsilon([release], 1e-4)
    old = SiteBudget(tmp_path, USERS[:100], max_epsilon=2.5 * cost, max_delta=1e-3)
    old.charge("run-1", release)
    old.charge("run-2", release)

    grown = SiteBudget(tmp_path, USERS, max_epsilon=2.5 * cost, max_delta=1e-3)
    with pytest.raises(SiteBudgetError, match="refused"):  # the first 100 users would pass it
        grown.charge("run-3", release)
    newcomers = SiteBudget(tmp_path, USERS[100:], max_epsilon=2.5 * cost, max_delta=1e-3)
    assert newcomers.charge("run-3", release).epsilon == pytest.approx(cost)


def test_a_coordinator_that_under_states_the_noise_is_refused_by_the_sites_own_accounting(tmp_path):
    # the coordinator calibrates 5 rounds to epsilon 8 with the noise split over 9 sites' shares
    # (as if secure aggregation summed them), but each site's upload reaches it alone
    sigma = calibrate(8.0, 1.0, 5, 1e-4 / 10, full=0)
    honest = UserLevelDP(sigma, shares=1)
    split = UserLevelDP(sigma, shares=9)
    delta = 1e-4 / 10

    weak = run_epsilon([Release("full", split.noise_multiplier)] * 5, delta)  # the claim
    real = run_epsilon([training_release(split, None)] * 5, delta)  # what the site applies

    assert weak == pytest.approx(run_epsilon([training_release(honest, None)] * 5, delta))
    assert weak <= 8.0 * (1 + 1e-6) < real
    budget = SiteBudget(tmp_path, USERS, max_epsilon=8.0, max_delta=1e-4)
    with pytest.raises(SiteBudgetError, match="refused"):
        for _ in range(5):
            budget.charge("run-1", training_release(split, None))
    honest_site = SiteBudget(tmp_path / "other", USERS, max_epsilon=8.0, max_delta=1e-4)
    for _ in range(5):
        spent = honest_site.charge("run-1", training_release(honest, None))
    assert spent.run_epsilon == pytest.approx(weak, rel=1e-9)


def _refusals(budget: SiteBudget, probes: list[float]) -> list[bool]:
    """Which of the runs asking ``probes`` (epsilon) the site refuses at enrolment."""
    refused = []
    for epsilon in probes:
        try:
            budget.check_run(f"probe-{epsilon!r}", epsilon)
        except SiteBudgetError:
            refused.append(True)
        else:
            refused.append(False)
    return refused


def test_a_sites_refusals_do_not_give_away_its_number_of_users(tmp_path):
    """The attack: the coordinator chose every run a site answered, so it can compute what the
    site has spent for each count of users the site may have, and ask a run whose epsilon lies
    between the epsilon left at one count and at the next. A refusal costs nothing. With a delta
    cap of 1 / users (the weak form) the answers differ between 150 and 151 users: the count is
    found exactly, though the site sends it only with noise. With the default cap, a public
    number, every count answers every probe alike."""
    from models.sites.budget import DEFAULT_MAX_DELTA, count_release

    releases = [count_release(), Release("full", 0.8), Release("evaluation", 3.2)]

    def site(n_users: int, max_delta: float | None) -> SiteBudget:
        folder = tmp_path / f"{n_users}-{max_delta}"
        budget = SiteBudget(folder, USERS[:n_users], max_epsilon=10.0, max_delta=max_delta)
        for release in releases:
            budget.charge("answered", release)
        return budget

    counts = (150, 151, 200)
    weak = {n: site(n, 1.0 / n) for n in counts}
    left = sorted(10.0 - b._spent()[0] for b in weak.values())  # what the attacker computes
    probes = [e + d for e in left for d in (-1e-6, 1e-6)]

    answers = {n: _refusals(b, probes) for n, b in weak.items()}
    assert answers[150] != answers[151] != answers[200]  # the count, told apart by one user

    default = {n: site(n, None) for n in counts}
    answers = {n: _refusals(b, probes) for n, b in default.items()}
    assert answers[150] == answers[151] == answers[200]
    assert all(b.max_delta == DEFAULT_MAX_DELTA for b in default.values())
    # and at the epsilon left under the default cap, too
    edge = 10.0 - default[150]._spent()[0]
    for n, budget in default.items():
        assert _refusals(budget, [edge - 1e-6, edge + 1e-6]) == [False, True], n


def test_a_delta_cap_above_one_user_is_refused_when_the_site_starts(tmp_path):
    """With a cap above 1 / users, one release in 1 / cap may expose a user's rows whole."""
    with pytest.raises(SiteBudgetError) as refused:
        SiteBudget(tmp_path / "a", USERS, max_epsilon=10.0, max_delta=1.0 / 199)
    assert str(refused.value) == (
        "--max-delta delta cap 0.00502513 is above 1 / the site's 200 users (0.005): with that "
        "probability a release may expose one user's rows whole; allowed: --max-delta at most "
        "1 / users, a round number (the coordinator learns it from the site's refusals)"
    )
    assert not (tmp_path / "a").exists()  # nothing made
    SiteBudget(tmp_path / "b", USERS, max_epsilon=10.0, max_delta=1.0 / 200)

    many = np.arange(1_000_001).astype(str)
    with pytest.raises(SiteBudgetError, match=r"^the default delta cap 1e-06 is above 1 / the "
                       r"site's 1000001 users \(1e-06\)"):  # fmt: skip
        SiteBudget(tmp_path / "c", many, max_epsilon=10.0)


def _torn(path) -> str:
    """Half of the ledger's last entry appended, as a crash in the middle of a write leaves."""
    line = path.read_text().splitlines()[-1]
    return line[: len(line) // 2]


@pytest.mark.parametrize(
    ("tear", "number"),
    [
        (lambda path, whole: whole + _torn(path), 3),  # the last line cut short
        (lambda path, whole: whole + _torn(path) + "\n", 3),
        (lambda path, whole: _torn(path) + "\n" + whole, 1),  # an earlier one: not the last
        (lambda path, whole: whole + '{"run": "run-3"}\n', 3),  # JSON, not an entry
        (lambda path, whole: whole + "null\n", 3),
        (lambda path, whole: whole.replace('"kind": "full"', '"kind": "half"', 1), 1),
        (lambda path, whole: whole.replace('"epsilon": ', '"epsilon": -', 1), 1),
    ],
    ids=["torn-last", "torn-last-newline", "torn-first", "not-an-entry", "null", "kind",
         "negative"],
)  # fmt: skip
def test_an_unreadable_ledger_line_stops_the_site_and_every_charge_naming_it(
    tmp_path, tear, number
):
    """The weak version: a torn line in ``entries.jsonl`` (a crash mid-write) let the site
    start, then refuse every private request with ``could not compute its answer
    (JSONDecodeError ...)``, its own log saying only ``Unterminated string starting at: line 1
    column 77``. Dropping the line would free what it charged, so the site refuses to start on
    it, and every read of the ledger names the file, the line and how to repair it; nothing is
    written, reset or dropped."""
    from fedrec.sites.budget import LedgerUnreadable

    folder = tmp_path / "budget"
    budget = SiteBudget(folder, USERS, max_epsilon=10.0)
    budget.charge("run-1", Release("full", 2.0))
    budget.charge("run-2", Release("full", 2.0))
    path = folder / ENTRIES
    path.write_text(tear(path, path.read_text()))
    torn = path.read_bytes()

    expected = (
        f"{path}, line {number}: not a whole entry of this site's privacy budget (a write cut "
        "short by a crash, or an edit), so what its users have spent cannot be counted; "
        "refused rather than reset or under-counted: restore the file from a backup, or "
        "remove that line by hand (what it charged is then no longer counted)"
    )
    with pytest.raises(LedgerUnreadable) as refused:
        SiteBudget(folder, USERS, max_epsilon=10.0)  # a restarted site
    assert str(refused.value) == expected
    assert refused.value.public == (
        "privacy budget of this site: its ledger cannot be read (the site's own log says "
        "why): refused"
    )
    for reads in (
        lambda: budget.charge("run-3", Release("full", 2.0)),  # the site that was running
        lambda: budget.check_run("run-3", 1.0),
        lambda: budget.run_releases("run-1"),
    ):
        with pytest.raises(LedgerUnreadable) as refused:
            reads()
        assert str(refused.value) == expected
    assert path.read_bytes() == torn  # nothing appended, dropped or rewritten


@pytest.mark.parametrize(
    "change",
    [{"users_sha256": 7}, {"at": "1700000000000"}, {"at": True}, {"at": math.inf},
     {"epsilon": True}, {"epsilon": -0.5}, {"delta": math.nan}, {"run": 3}],
)  # fmt: skip
def test_a_ledger_line_with_a_field_of_the_wrong_kind_is_not_a_whole_entry(tmp_path, change):
    """Each field of a written line, replaced by a value of the wrong kind (a bool is no
    number, nor an infinity): the line is not an entry, and the site does not start on it."""
    import json

    from fedrec.sites.budget import LedgerUnreadable

    folder = tmp_path / "budget"
    SiteBudget(folder, USERS, max_epsilon=10.0).charge("run-1", Release("full", 2.0))
    path = folder / ENTRIES
    line = json.loads(path.read_text())
    SiteBudget(folder, USERS, max_epsilon=10.0)  # the line as written is whole

    path.write_text(json.dumps(line | change) + "\n")

    with pytest.raises(LedgerUnreadable, match="line 1: not a whole entry"):
        SiteBudget(folder, USERS, max_epsilon=10.0)
