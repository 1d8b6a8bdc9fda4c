import pytest

from models.promotion import decide_promotion, lower_is_better

RULE = {
    "metric": "valid/rmse",
    "worst_client_metric": "valid/client_max/rmse",
    "min_delta": 0.01,
    "max_client_regression": 0.02,
}


def test_first_model_is_promoted():
    assert decide_promotion({"valid/rmse": 0.9}, None, **RULE).promote


@pytest.mark.parametrize(
    ("candidate", "champion", "promote", "reason"),
    [
        (
            {"valid/rmse": 0.88, "valid/client_max/rmse": 0.95},
            {"valid/rmse": 0.90, "valid/client_max/rmse": 0.95},
            True,
            "beats champion",
        ),
        (
            {"valid/rmse": 0.895, "valid/client_max/rmse": 0.95},
            {"valid/rmse": 0.90, "valid/client_max/rmse": 0.95},
            False,
            "< min_delta 0.01",
        ),
        (
            {"valid/rmse": 0.95, "valid/client_max/rmse": 0.95},
            {"valid/rmse": 0.90, "valid/client_max/rmse": 0.95},
            False,
            "valid/rmse 0.9500 vs champion 0.9000: worse by 0.0500",
        ),
        (
            {"valid/rmse": 0.85, "valid/client_max/rmse": 1.00},
            {"valid/rmse": 0.90, "valid/client_max/rmse": 0.95},
            False,
            "worst client",
        ),
    ],
)
def test_rmse_rule(candidate, champion, promote, reason):
    decision = decide_promotion(candidate, champion, **RULE)
    assert decision.promote is promote and reason in decision.reason


def test_higher_is_better_for_ranking_metrics():
    rule = {
        "metric": "valid/ndcg_at_10",
        "worst_client_metric": "valid/client_min/ndcg_at_10",
        "min_delta": 0.0,
        "max_client_regression": 0.01,
    }
    better = decide_promotion(
        {"valid/ndcg_at_10": 0.3, "valid/client_min/ndcg_at_10": 0.2},
        {"valid/ndcg_at_10": 0.25, "valid/client_min/ndcg_at_10": 0.2},
        **rule,
    )
    worse_client = decide_promotion(
        {"valid/ndcg_at_10": 0.3, "valid/client_min/ndcg_at_10": 0.1},
        {"valid/ndcg_at_10": 0.25, "valid/client_min/ndcg_at_10": 0.2},
        **rule,
    )
    assert better.promote and not worse_client.promote
    assert lower_is_better("valid/mae") and not lower_is_better("valid/ndcg_at_10")


def test_failed_evaluation_is_never_promoted():
    assert not decide_promotion({}, {"valid/rmse": 1.0}, **RULE).promote
    rule = RULE | {
        "metric": "select/ndcg_at_10",
        "worst_client_metric": "select/client_min/ndcg_at_10",
    }
    decision = decide_promotion({"valid/ndcg_at_10": 0.3}, None, **rule)
    assert not decision.promote and decision.reason == (
        "candidate has no select/ndcg_at_10: no selection user (a fifth of the users, by id) has "
        "a validation row, or evaluation failed or was empty"
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("champion", [None, {"valid/rmse": 0.9}, {"valid/rmse": float("nan")}])
def test_a_candidate_metric_that_is_no_number_is_never_promoted(value, champion):
    """NaN compares False with everything, so it slipped past every refusal and "beat" the
    champion "by +nan" (and an error of -inf would beat any)."""
    decision = decide_promotion({"valid/rmse": value}, champion, **RULE)
    assert not decision.promote
    assert decision.reason == f"candidate's valid/rmse is {value}: no figure to promote on"
    ranking = RULE | {"metric": "valid/ndcg_at_10", "worst_client_metric": "x"}
    assert not decide_promotion(
        {"valid/ndcg_at_10": value}, {"valid/ndcg_at_10": 0.2}, **ranking
    ).promote


def test_a_champion_without_a_finite_figure_is_replaced():
    decision = decide_promotion({"valid/rmse": 0.9}, {"valid/rmse": float("nan")}, **RULE)
    assert decision.promote and "champion could not be evaluated" in decision.reason


def test_a_gap_too_small_for_four_decimals_is_shown_not_printed_as_zero():
    rule = RULE | {"min_delta": 0.0}
    decision = decide_promotion({"valid/rmse": 0.718}, {"valid/rmse": 0.718033}, **rule)
    assert decision.promote and decision.reason.endswith("by +3.3e-05")


def test_a_tie_is_not_an_improvement_even_with_zero_min_delta():
    rule = RULE | {"min_delta": 0.0}
    decision = decide_promotion({"valid/rmse": 0.9}, {"valid/rmse": 0.9}, **rule)
    assert not decision.promote and decision.reason.endswith("no improvement")


NDCG_RULE = RULE | {
    "metric": "valid/ndcg_at_10",
    "worst_client_metric": "valid/client_min/ndcg_at_10",
}


@pytest.mark.parametrize(
    ("candidate", "rule", "promote"),
    [
        ({"valid/rmse": 1.62, "baseline/valid/rmse": 0.98}, RULE, False),  # worse: refused
        ({"valid/rmse": 0.98, "baseline/valid/rmse": 0.98}, RULE, True),  # a tie is not worse
        ({"valid/rmse": 0.90, "baseline/valid/rmse": 0.98}, RULE, True),
        ({"valid/ndcg_at_10": 0.10, "baseline/valid/ndcg_at_10": 0.12}, NDCG_RULE, False),
        ({"valid/ndcg_at_10": 0.20, "baseline/valid/ndcg_at_10": 0.12}, NDCG_RULE, True),
        ({"valid/rmse": 1.62}, RULE, True),  # no baseline measured: the champion rule alone
    ],
)
def test_a_first_candidate_worse_than_the_trivial_baseline_is_not_promoted(
    candidate, rule, promote
):
    from models.promotion import WORSE_THAN_BASELINE

    decision = decide_promotion(candidate, None, **rule)

    assert decision.promote is promote
    assert (WORSE_THAN_BASELINE in decision.reason) is (not promote)


def test_the_baseline_gate_comes_before_the_champion():
    from models.promotion import WORSE_THAN_BASELINE

    candidate = {"valid/rmse": 1.05, "valid/client_max/rmse": 1.1, "baseline/valid/rmse": 0.99}
    champion = {"valid/rmse": 1.20, "valid/client_max/rmse": 1.3}  # a worse champion still

    decision = decide_promotion(candidate, champion, **RULE)

    assert not decision.promote
    assert decision.reason == f"{WORSE_THAN_BASELINE}: valid/rmse 1.0500 vs the baseline's 0.9900"


def test_a_private_shortfall_below_the_baseline_refuses_only_beyond_the_dp_noise():
    from models.promotion import WORSE_THAN_BASELINE

    noisy = {**RULE, "noise_sds": 2.0}
    floored = {"valid/rmse": 0.70, "valid/dp_sd/rmse": 0.30,  # a noisy sum floored at 0
               "baseline/valid/rmse": 0.0, "baseline/valid/dp_sd/rmse": 0.25}  # fmt: skip
    broken = {"valid/rmse": 3.1, "valid/dp_sd/rmse": 0.04,
              "baseline/valid/rmse": 0.95, "baseline/valid/dp_sd/rmse": 0.03}  # fmt: skip

    let_through = decide_promotion(floored, None, **noisy)  # 0.70 < 2 * hypot = 0.78
    assert let_through.promote
    assert let_through.reason == (
        "no champion yet; candidate valid/rmse=0.7000 (below the trivial baseline's 0.0000 by "
        "0.7000, within the DP noise of the two released figures)"
    )
    assert (
        "baseline" not in decide_promotion(floored | {"valid/rmse": 0.0}, None, **noisy).reason
    )  # not below it: nothing to say
    assert not decide_promotion(floored, None, **RULE).promote  # no margin: refused as before
    refused = decide_promotion(broken, None, **noisy)
    assert not refused.promote
    assert refused.reason == (
        f"{WORSE_THAN_BASELINE}: valid/rmse 3.1000 vs the baseline's 0.9500, worse by 2.1500, "
        "beyond the DP noise of the two released figures (2 standard deviations of their "
        "difference: 0.1000)"
    )
    without_spread = {k: v for k, v in floored.items() if k != "baseline/valid/dp_sd/rmse"}
    assert not decide_promotion(without_spread, None, **noisy).promote
    nan = floored | {"valid/rmse": float("nan")}
    assert not decide_promotion(nan, None, **noisy).promote


def test_with_the_noise_margin_a_model_better_than_the_baseline_is_rarely_refused_by_it():
    """A model truly better than the baseline (sse 800 against 1000 over the same 1,000 rows) and
    a broken one (sse 4000), each evaluated with the baseline in one DP release by 3 clients at a
    noise that makes the released figures unreliable. The plain gate refuses the better model
    often; with the 2-standard-deviation margin rarely, and the broken one is still refused."""
    import numpy as np

    from models.metrics import finalize_metrics
    from models.privacy.released_metrics import MetricRelease, released_noise

    release = MetricRelease(noise_multiplier=2.0)
    rng = np.random.default_rng(2)

    def released(sse: float) -> dict[str, float]:
        sums = [
            {"valid": ({"sse": sse / 3, "sae": 600.0, "n": 1000.0 / 3}, None),
             "baseline/valid": ({"sse": 1000.0 / 3, "sae": 700.0, "n": 1000.0 / 3}, None)}
            for _ in range(3)
        ]  # fmt: skip
        uploads = [release.publish(client, rng) for client in sums]
        out = {}
        for split in ("valid", "baseline/valid"):
            total = {key: sum(u[split][0][key] for u in uploads) for key in ("sse", "sae", "n")}
            out[f"{split}/rmse"] = finalize_metrics(total, k=10)["rmse"]
            out[f"{split}/dp_sd/rmse"] = released_noise(uploads, release, 10)[f"{split}/rmse"]
        return out

    plain = guarded = broken = 0
    for _ in range(1000):
        better = released(800.0)
        plain += not decide_promotion(better, None, **RULE).promote
        guarded += not decide_promotion(better, None, **RULE, noise_sds=2.0).promote
        broken += not decide_promotion(released(4000.0), None, **RULE, noise_sds=2.0).promote

    assert plain / 1000 > 0.15
    assert guarded / 1000 < 0.02
    assert broken / 1000 > 0.95


def test_a_private_gain_within_the_dp_noise_of_both_figures_is_not_promoted():
    noisy = {**RULE, "min_delta": 0.0, "noise_sds": 2.0}
    champion = {"valid/rmse": 0.90, "valid/dp_sd/rmse": 0.03}
    close = {"valid/rmse": 0.85, "valid/dp_sd/rmse": 0.04}  # gain 0.05 < 2 * hypot = 0.10
    clear = {"valid/rmse": 0.79, "valid/dp_sd/rmse": 0.04}

    refused = decide_promotion(close, champion, **noisy)
    assert (
        not refused.promote
        and "within the DP noise" in refused.reason
        and "0.1000" in refused.reason
    )
    assert decide_promotion(clear, champion, **noisy).promote
    assert decide_promotion(close, champion, **{**noisy, "noise_sds": 0.0}).promote
    assert decide_promotion({"valid/rmse": 0.85}, champion, **noisy).promote  # no spread given


def test_with_the_noise_margin_a_model_no_better_than_the_champion_rarely_replaces_it():
    """Candidate and champion are the same model; each evaluation is a fresh DP release of the
    same sums by 3 clients. Comparing the released RMSEs promotes it about half the time; with
    the 2-standard-deviation margin, about 2.3% (one-sided normal tail), here under 5%."""
    import numpy as np

    from models.metrics import finalize_metrics
    from models.privacy.released_metrics import MetricRelease, released_noise

    release = MetricRelease(noise_multiplier=0.5)
    sums = [{"valid": ({"sse": 900.0 + 50 * c, "sae": 700.0, "n": 1000.0}, None)} for c in range(3)]
    rng = np.random.default_rng(1)

    def released() -> dict[str, float]:
        uploads = [release.publish(client, rng) for client in sums]
        total = {key: sum(u["valid"][0][key] for u in uploads) for key in ("sse", "sae", "n")}
        sd = released_noise(uploads, release, 10)["valid/rmse"]
        return {"valid/rmse": finalize_metrics(total, k=10)["rmse"], "valid/dp_sd/rmse": sd}

    rule = {**RULE, "min_delta": 0.0}
    plain = guarded = 0
    for _ in range(2000):
        candidate, champion = released(), released()
        plain += decide_promotion(candidate, champion, **rule).promote
        guarded += decide_promotion(candidate, champion, **rule, noise_sds=2.0).promote

    assert 0.45 < plain / 2000 < 0.55
    assert guarded / 2000 < 0.05


@pytest.mark.parametrize(
    ("metric", "new", "old"),
    [("valid/rmse", 0.75, 1.0), ("valid/ndcg_at_10", 0.5, 0.25)],
)
def test_an_improvement_of_exactly_min_delta_is_promoted(metric, new, old):
    """The rule asks for an improvement of at least ``min_delta`` (values exact in binary)."""
    rule = {"metric": metric, "worst_client_metric": "none", "min_delta": 0.25,
            "max_client_regression": 0.0}  # fmt: skip

    decision = decide_promotion({metric: new}, {metric: old}, **rule)

    assert decision.promote and decision.reason.endswith("by +0.2500")
    assert not decide_promotion({metric: new}, {metric: old}, **rule | {"min_delta": 0.5}).promote


def test_a_worst_client_measured_on_one_side_only_does_not_block_promotion():
    """The worst-client check compares two measurements: when the champion's (or the
    candidate's) is missing, the primary metric decides."""
    candidate = {"valid/rmse": 0.80, "valid/client_max/rmse": 5.0}
    champion = {"valid/rmse": 0.90}

    assert decide_promotion(candidate, champion, **RULE).promote
    assert decide_promotion(champion | {"valid/rmse": 0.80}, candidate | {"valid/rmse": 0.9},
                            **RULE).promote  # fmt: skip


def test_a_worst_client_regression_of_exactly_the_allowed_margin_is_promoted():
    """``max_client_regression`` is the largest regression allowed, not excluded."""
    rule = RULE | {"max_client_regression": 0.25}
    candidate = {"valid/rmse": 0.5, "valid/client_max/rmse": 1.25}
    champion = {"valid/rmse": 0.75, "valid/client_max/rmse": 1.0}

    assert decide_promotion(candidate, champion, **rule).promote
    assert not decide_promotion(
        candidate | {"valid/client_max/rmse": 1.5}, champion, **rule
    ).promote


@pytest.mark.parametrize(("new", "promote"), [(1.375, True), (1.5, False)])
def test_a_noise_margin_below_one_standard_deviation_still_applies_and_is_inclusive(new, promote):
    """The margin is ``noise_sds * hypot(sd_candidate, sd_champion)``: 0.5 * hypot(0.75, 1.0) =
    0.625 here (exact in binary); a gain of exactly the margin clears it, a smaller one does not."""
    noisy = {**RULE, "min_delta": 0.0, "noise_sds": 0.5}
    champion = {"valid/rmse": 2.0, "valid/dp_sd/rmse": 0.75}
    candidate = {"valid/rmse": new, "valid/dp_sd/rmse": 1.0}

    decision = decide_promotion(candidate, champion, **noisy)

    assert decision.promote is promote
    assert ("within the DP noise" in decision.reason) is (not promote)


@pytest.mark.parametrize(("gap", "shown"), [(7e-5, "+0.0001"), (2e-4, "+0.0002"), (3e-5, "+3e-05")])
def test_a_gap_is_printed_to_four_decimals_unless_that_would_print_zero(gap, shown):
    rule = RULE | {"min_delta": 0.0}
    decision = decide_promotion({"valid/rmse": 0.5 - gap}, {"valid/rmse": 0.5}, **rule)

    assert decision.promote and decision.reason.endswith(f"by {shown}")


def test_the_flows_decision_takes_the_noise_margin_and_drops_the_worst_client_only_if_private():
    """tasks.server.decide: a private run's figures are compared with a margin of two standard
    deviations of their noise and without the worst-client rule (each client's release is too
    noisy for it); a plain run's are compared as they are."""
    from tasks.server import decide

    champion = {"valid/rmse": 0.90, "valid/dp_sd/rmse": 0.03, "valid/client_max/rmse": 1.0}

    def candidate(rmse: float) -> dict[str, float]:  # its worst client 0.5 worse than before
        return {"valid/rmse": rmse, "valid/dp_sd/rmse": 0.04, "valid/client_max/rmse": 1.5}

    # the noise of the difference: hypot(0.03, 0.04) = 0.05, so the margin is 0.10
    assert decide.fn(candidate(0.78), champion, "valid/rmse", 0.0, 0.05, private=True).promote
    within = decide.fn(candidate(0.81), champion, "valid/rmse", 0.0, 0.05, private=True)
    assert not within.promote and "within the DP noise" in within.reason
    assert not decide.fn(candidate(0.78), champion, "valid/rmse", 0.0, 0.05).promote  # worst client
    assert decide.fn(candidate(0.81), champion, "valid/rmse", 0.0, 1.0).promote  # no margin

    empty = {"valid/dp_sd/rmse": 0.04}
    plain = decide.fn(empty, champion, "valid/rmse", 0.0, 0.05)
    assert plain.reason == "candidate has no valid/rmse: evaluation failed or was empty"
    private = decide.fn(empty, champion, "valid/rmse", 0.0, 0.05, private=True)
    assert not private.promote and private.reason.startswith(plain.reason + ", or the DP noise")


@pytest.mark.parametrize(("noise_sds", "new"), [(1.0, 0.1875), (0.5, 0.34375)])
def test_a_shortfall_of_exactly_the_noise_margin_below_the_baseline_is_let_through_and_said(
    noise_sds, new
):
    """On a metric that rises as models improve: the margin is ``noise_sds * hypot(3/16, 1/4)``
    = ``noise_sds * 5/16`` (exact in binary), and the candidate falls short by exactly that."""
    from models.promotion import WORSE_THAN_BASELINE, check_baseline

    metric = "valid/ndcg_at_10"
    candidate = {metric: new, "valid/dp_sd/ndcg_at_10": 0.1875,
                 "baseline/valid/ndcg_at_10": 0.5, "baseline/valid/dp_sd/ndcg_at_10": 0.25}  # fmt: skip
    rule = {"metric": metric, "worst_client_metric": "valid/client_min/ndcg_at_10",
            "min_delta": 0.0, "max_client_regression": 1.0}  # fmt: skip

    let_through = decide_promotion(candidate, None, **rule, noise_sds=noise_sds)

    assert let_through.promote
    assert let_through.reason == (
        f"no champion yet; candidate {metric}={new:.4f} (below the trivial baseline's 0.5000 by "
        f"{0.5 - new:.4f}, within the DP noise of the two released figures)"
    )
    # without a margin (at 0, and by default) the same shortfall refuses, and says no margin
    refused = f"{WORSE_THAN_BASELINE}: {metric} {new:.4f} vs the baseline's 0.5000"
    assert decide_promotion(candidate, None, **rule, noise_sds=0.0).reason == refused
    assert check_baseline(candidate, metric).reason == refused
