"""The promotion rule: should a candidate model replace the champion?"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# Evaluation splits and metrics of the trivial baseline carry this prefix: ``baseline/valid/rmse``
# is the baseline's ``valid/rmse`` on the same validation rows as the candidate's.
BASELINE = "baseline"
# The start of the reason a candidate worse than the baseline is not promoted.
WORSE_THAN_BASELINE = "worse than the trivial baseline"


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str


def baseline_metric(metric: str) -> str:
    """The name of the trivial baseline's value of ``metric`` among a candidate's metrics."""
    return f"{BASELINE}/{metric}"


def worst_client_metric(metric: str) -> str:
    """The name of the worst client's value of ``metric`` (``valid/rmse`` ->
    ``valid/client_max/rmse``, ``valid/ndcg_at_10`` -> ``valid/client_min/ndcg_at_10``)."""
    split, _, name = metric.rpartition("/")
    return f"{split}/client_{'max' if lower_is_better(metric) else 'min'}/{name}"


def noise_metric(metric: str) -> str:
    """The name of the DP noise's standard deviation in a released ``metric`` (``valid/rmse`` ->
    ``valid/dp_sd/rmse``), grouped with its split as the per-client spreads are."""
    split, _, name = metric.rpartition("/")
    return f"{split}/dp_sd/{name}"


def check_baseline(
    candidate: Mapping[str, float], metric: str, noise_sds: float = 0.0
) -> PromotionDecision | None:
    """A refusal when the candidate is worse on ``metric`` than the trivial baseline measured on
    the same rows (``baseline/<metric>`` among its metrics); None when it is not worse, or when
    no baseline was measured. With ``noise_sds`` and the ``dp_sd`` of both released figures
    (:func:`noise_metric`), the candidate must be worse by more than that many standard
    deviations of their difference: a gap the DP noise could make is no evidence of a broken
    model (a noisy sum floored at 0 can put the baseline at RMSE 0.0), while a broken model's
    gap is far larger."""
    base = candidate.get(baseline_metric(metric))
    if base is None or metric not in candidate or not np.isfinite(base):
        return None
    new = candidate[metric]
    sign = -1.0 if lower_is_better(metric) else 1.0
    worse = sign * (base - new)
    if np.isfinite(new) and worse <= 0:
        return None
    reason = f"{WORSE_THAN_BASELINE}: {metric} {new:.4f} vs the baseline's {base:.4f}"
    spreads = (
        candidate.get(noise_metric(metric)),
        candidate.get(noise_metric(baseline_metric(metric))),
    )
    if np.isfinite(new) and noise_sds > 0 and None not in spreads:
        margin = noise_sds * float(np.hypot(*spreads))
        if worse <= margin:
            return None
        reason += (
            f", worse by {_size(worse)}, beyond the DP noise of the two released figures "
            f"({noise_sds:g} standard deviations of their difference: {margin:.4f})"
        )
    return PromotionDecision(False, reason)


def lower_is_better(metric: str) -> bool:
    """Error metrics (rmse, mae) fall as models improve; ranking metrics rise."""
    return metric.rpartition("/")[2].startswith(("rmse", "mae"))


def _size(gap: float) -> str:
    """A positive gap between two metrics, to four decimals, or to two significant digits when
    that would print 0.0000."""
    return f"{gap:.4f}" if gap >= 5e-5 else f"{gap:.2g}"


def decide_promotion(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    *,
    metric: str,
    worst_client_metric: str,
    min_delta: float,
    max_client_regression: float,
    noise_sds: float = 0.0,
) -> PromotionDecision:
    """Promote when the candidate is not worse than the trivial baseline on the same rows
    (:func:`check_baseline`, beyond the DP noise with ``noise_sds``: a promotion reason then says
    when the candidate's figure is below the baseline's), beats the champion by ``min_delta`` on
    ``metric``, and its worst client is not more than ``max_client_regression`` worse than the
    champion's worst client.

    Parameters
    ----------
    candidate, champion : mapping of metric name to value
        Both measured by the same federated evaluation on the same clients; ``champion`` is None
        when there is no champion yet. ``candidate`` may hold ``baseline/<metric>``, the trivial
        baseline's value on the same rows.
    metric : str
        The primary metric, e.g. ``valid/rmse`` or ``valid/ndcg_at_10``.
    worst_client_metric : str
        The per-client extreme of the same metric, e.g. ``valid/client_max/rmse``.
    min_delta, max_client_regression : float
        Absolute margins, in the metric's units.
    noise_sds : float
        For released (DP) metrics: an improvement on the champion must also exceed this many
        standard deviations of the difference of the two released figures, ``hypot`` of their
        ``dp_sd`` metrics (:func:`noise_metric`), and a shortfall below the baseline refuses only
        beyond as many; without those, or at 0, no such margin.

    Returns
    -------
    PromotionDecision
    """
    if metric not in candidate:
        why = "evaluation failed or was empty"
        if metric.startswith("select/"):  # models.client.selection_users
            why = "no selection user (a fifth of the users, by id) has a validation row, or " + why
        return PromotionDecision(False, f"candidate has no {metric}: {why}")
    if not np.isfinite(candidate[metric]):  # NaN compares False with everything below
        return PromotionDecision(
            False, f"candidate's {metric} is {candidate[metric]}: no figure to promote on"
        )
    refused = check_baseline(candidate, metric, noise_sds)
    if refused is not None:
        return refused
    base = candidate.get(baseline_metric(metric), math.nan)
    short = (-1.0 if lower_is_better(metric) else 1.0) * (base - candidate[metric])
    # let through by the noise margin below the baseline: said in the reason, not hidden
    note = (
        f" (below the trivial baseline's {base:.4f} by {_size(short)}, within the DP noise of "
        "the two released figures)"
        if short > 0
        else ""
    )

    def promoted(reason: str) -> PromotionDecision:
        return PromotionDecision(True, reason + note)

    if champion is None:
        return promoted(f"no champion yet; candidate {metric}={candidate[metric]:.4f}")
    if metric not in champion or not np.isfinite(champion[metric]):
        return promoted(f"champion could not be evaluated on {metric}; candidate replaces it")
    new, old = candidate[metric], champion[metric]
    sign = -1.0 if lower_is_better(metric) else 1.0
    gain = sign * (new - old)
    if gain == 0:  # a tie is no improvement (retraining on unchanged data gives one)
        return PromotionDecision(False, f"{metric} {new:.4f} vs champion {old:.4f}: no improvement")
    if gain < 0:
        return PromotionDecision(
            False, f"{metric} {new:.4f} vs champion {old:.4f}: worse by {_size(-gain)}"
        )
    if gain < min_delta:
        return PromotionDecision(
            False,
            f"{metric} {new:.4f} vs champion {old:.4f}: improvement +{_size(gain)} < min_delta {min_delta}",
        )
    spreads = candidate.get(noise_metric(metric)), champion.get(noise_metric(metric))
    if noise_sds > 0 and None not in spreads:
        margin = noise_sds * float(np.hypot(*spreads))
        if gain < margin:
            return PromotionDecision(
                False,
                f"{metric} {new:.4f} vs champion {old:.4f}: improvement +{_size(gain)} is within the "
                f"DP noise of the two released figures ({noise_sds:g} standard deviations of "
                f"their difference: {margin:.4f})",
            )
    worst_new = candidate.get(worst_client_metric)
    worst_old = champion.get(worst_client_metric)
    if worst_new is not None and worst_old is not None:
        regression = sign * (worst_old - worst_new)
        if regression > max_client_regression:
            return PromotionDecision(
                False,
                f"{metric} improved +{_size(gain)}, but the worst client's {worst_client_metric} went "
                f"{worst_old:.4f} -> {worst_new:.4f} (worse by {regression:.4f} > {max_client_regression})",
            )
    return promoted(f"{metric} {new:.4f} beats champion {old:.4f} by +{_size(gain)}")
