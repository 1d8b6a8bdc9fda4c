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
            "no improvement",
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
        ({"valid/rmse": float("nan"), "baseline/valid/rmse": 0.98}, RULE, False),
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
