"""The promotion rule: should a candidate model replace the champion?"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str


def lower_is_better(metric: str) -> bool:
    """Error metrics (rmse, mae) fall as models improve; ranking metrics rise."""
    return metric.split("_")[-1].startswith(("rmse", "mae"))


def decide_promotion(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    *,
    metric: str,
    worst_client_metric: str,
    min_delta: float,
    max_client_regression: float,
) -> PromotionDecision:
    """Promote when the candidate beats the champion by ``min_delta`` on ``metric`` and its worst
    client is not more than ``max_client_regression`` worse than the champion's worst client.

    Parameters
    ----------
    candidate, champion : mapping of metric name to value
        Both measured by the same federated evaluation on the same clients; ``champion`` is None
        when there is no champion yet.
    metric : str
        The primary metric, e.g. ``valid_rmse`` or ``valid_ndcg_at_10``.
    worst_client_metric : str
        The per-client extreme of the same metric, e.g. ``valid_rmse_client_max``.
    min_delta, max_client_regression : float
        Absolute margins, in the metric's units.

    Returns
    -------
    PromotionDecision
    """
    if metric not in candidate:
        return PromotionDecision(
            False, f"candidate has no {metric}: evaluation failed or was empty"
        )
    if champion is None:
        return PromotionDecision(
            True, f"no champion yet; candidate {metric}={candidate[metric]:.4f}"
        )
    if metric not in champion:
        return PromotionDecision(
            True, f"champion could not be evaluated on {metric}; candidate replaces it"
        )
    new, old = candidate[metric], champion[metric]
    sign = -1.0 if lower_is_better(metric) else 1.0
    gain = sign * (new - old)
    if gain <= 0:  # a tie is no improvement (retraining on unchanged data gives one)
        return PromotionDecision(False, f"{metric} {new:.4f} vs champion {old:.4f}: no improvement")
    if gain < min_delta:
        return PromotionDecision(
            False,
            f"{metric} {new:.4f} vs champion {old:.4f}: improvement {gain:+.4f} < min_delta {min_delta}",
        )
    worst_new = candidate.get(worst_client_metric)
    worst_old = champion.get(worst_client_metric)
    if worst_new is not None and worst_old is not None:
        regression = sign * (worst_old - worst_new)
        if regression > max_client_regression:
            return PromotionDecision(
                False,
                f"{metric} improved {gain:+.4f}, but the worst client's {worst_client_metric} went "
                f"{worst_old:.4f} -> {worst_new:.4f} (worse by {regression:.4f} > {max_client_regression})",
            )
    return PromotionDecision(True, f"{metric} {new:.4f} beats champion {old:.4f} by {gain:+.4f}")
