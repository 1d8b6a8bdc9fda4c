"""A private run's final evaluation as a counted differential-privacy release.

Under ``--dp-epsilon`` every client evaluates the final model (and the champion, and the
trivial baseline, on the same rows) once and sends metric sums of its held-out rows. Those sums
depend on its users' rows, so each client's upload is a Gaussian mechanism of its own:

- **bounded per user.** A user's rows in a held-out split count at most ``max_rows`` (a sample
  drawn from OS entropy, :func:`capped_rows`) and each row's rating error is clipped to
  ``[-error_clip, error_clip]`` (:func:`bounded_error_sums`; the explicit family does both when it
  is given a :class:`MetricRelease`), so one user adds at most ``max_rows * error_clip**2`` to a
  split's ``sse``, ``max_rows * error_clip`` to ``sae`` and ``max_rows`` to ``n``. Ranking sums
  (precision, recall, NDCG, hit, MAP) are per-user averages, so a user adds at most 1 to each,
  and 1 to ``users``. :meth:`MetricRelease.bound` is that table; a sum without a bound cannot be
  released and is refused.
- **noised by the client.** Every released sum ``j`` gets Gaussian noise of deviation
  ``noise_multiplier * bound_j / a_j`` drawn from OS entropy, where the weights ``a_j`` have
  ``sum a_j^2 = 1`` (primary sums, those of RMSE, NDCG and recall, weigh 4x the others in
  deviation). Scaled by ``a_j / bound_j`` the sums move by at most 1 in L2 when one user is added
  or removed: one Gaussian mechanism of multiplier ``noise_multiplier`` per upload. Evaluation
  uploads are not securely aggregated, so each carries the full noise on its own: calibrated
  against the server, and the per-client metrics derived from an upload are post-processing.
- **counted.** A user sits in one client, so the uploads of one evaluation together are one such
  mechanism; the run's accountant composes one unsampled Gaussian release of ``noise_multiplier``
  per evaluation (the final model's, with its baseline in the same vector, and the champion's
  when there is one to compare) with the training rounds. The split of the budget: each
  evaluation's noise multiplier is :data:`EVALUATION_NOISE_RATIO` times the training's, and the
  training's is calibrated so that the whole composition meets ``--dp-epsilon``
  (:func:`evaluation_ratios`, :func:`~models.privacy.dp.calibrate`).

Not released under DP: the training split's metrics and per-item top-K counts. Noisy sums are
floored at 0 (every true sum is non-negative; post-processing), and the metrics computed from
them are kept within what exact sums can give (:func:`~models.metrics.finalize_metrics`).

How far the noise moves a metric computed from the released sums is public (the deviations
depend on the configuration only): :func:`released_noise` gives one standard deviation of it, so
that a run on few held-out rows says its metrics are mostly noise instead of leaving a reader to
guess.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from models.metrics import RANKING_KEYS
from models.mf.als import RatingRows
from models.privacy.dp import clip_values, limit_items

# an evaluation release's noise multiplier, in multiples of the training's: each release then
# costs as much as 1/16 of a training round without sampling (Gaussian mechanisms compose by
# their 1/sigma^2), and at epsilon 8 on ML-1M's one-round private default the training's noise
# multiplier grows from 0.530 to 0.546 to pay for it (benchmarks/README.md)
EVALUATION_NOISE_RATIO = 4.0
EVALUATION_MAX_ROWS = 10  # held-out rows of one user counted per split
# a row's rating error, clipped to [-2.5, 2.5]: on ML-1M at epsilon 8 the released validation RMSE
# is then within 0.004 of the capped rows' exact RMSE on average, with a deviation of 0.017 (a clip
# of 2 biases it by -0.03 for 0.011, one of 3 by 0.001 for 0.031)
EVALUATION_ERROR_CLIP = 2.5
# sums whose metrics are the headline ones (RMSE, NDCG, recall) get this much more weight than the
# others (MAE, precision, hit rate, MAP) in deviation units
PRIMARY_SUMS = frozenset({"sse", "n", "ndcg", "recall", "users"})
PRIMARY_WEIGHT = 4.0
RANKING_SUMS = frozenset({"precision", "recall", "ndcg", "hit", "map", "users"})

Evaluation = tuple[dict[str, float], np.ndarray | None]


@dataclass(frozen=True)
class MetricRelease:
    """How a private client bounds and noises its evaluation sums (see the module docstring)."""

    noise_multiplier: float
    max_rows: int = EVALUATION_MAX_ROWS
    error_clip: float = EVALUATION_ERROR_CLIP

    def __post_init__(self) -> None:
        if not 0 < self.noise_multiplier < math.inf:
            raise ValueError(f"noise_multiplier={self.noise_multiplier} must be > 0 and finite")
        if (
            isinstance(self.max_rows, bool)
            or not isinstance(self.max_rows, int)
            or self.max_rows < 1
        ):
            raise ValueError(f"max_rows={self.max_rows!r} must be a whole number >= 1")
        if not 0 < self.error_clip < math.inf:
            raise ValueError(f"error_clip={self.error_clip} must be > 0 and finite")

    def bound(self, key: str) -> float:
        """One user's largest contribution to the evaluation sum ``key`` of one split."""
        if key == "sse":
            return self.max_rows * self.error_clip**2
        if key == "sae":
            return self.max_rows * self.error_clip
        if key == "n":
            return float(self.max_rows)
        if key in RANKING_SUMS:
            return 1.0
        raise ValueError(
            f"evaluation sum {key!r} has no per-user bound: it cannot be released under DP"
        )

    def deviations(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """The noise deviation of each released (split, sum): ``noise_multiplier * bound / a``
        with weights ``a`` of squared sum 1, primary sums :data:`PRIMARY_WEIGHT` times the others."""
        raw = {k: PRIMARY_WEIGHT if k[1] in PRIMARY_SUMS else 1.0 for k in keys}
        norm = math.sqrt(sum(w * w for w in raw.values()))
        return {k: self.noise_multiplier * self.bound(k[1]) * norm / w for k, w in raw.items()}

    def sensitivity(self, keys: list[tuple[str, str]]) -> float:
        """One user's largest L2 change of the released sums in units of their deviations times
        ``noise_multiplier``: 1 by construction (what the accountant's Gaussian event assumes)."""
        deviations = self.deviations(keys)
        return math.sqrt(
            sum((self.bound(k[1]) * self.noise_multiplier / deviations[k]) ** 2 for k in keys)
        )

    def publish(
        self, evaluations: Mapping[str, Evaluation], rng: np.random.Generator
    ) -> dict[str, Evaluation]:
        """What a private client sends: every held-out split's sums plus their noise (the
        training split and per-item counts are not sent), floored at 0."""
        kept = {s: dict(sums) for s, (sums, _) in evaluations.items() if s != "train"}
        keys = [(s, k) for s in sorted(kept) for k in sorted(kept[s])]
        deviations = self.deviations(keys)
        noise = rng.normal(0.0, 1.0, len(keys))
        for (split, key), z in zip(keys, noise, strict=True):
            true = kept[split][key]  # a NaN would be floored to an exact 0, unnoised
            value = (true if math.isfinite(true) else 0.0) + z * deviations[(split, key)]
            kept[split][key] = max(0.0, float(value))
        return {split: (sums, None) for split, sums in kept.items()}


def capped_rows(rows: RatingRows, max_rows: int, rng: np.random.Generator) -> RatingRows:
    """At most ``max_rows`` of each user's rows, a random sample."""
    return limit_items(rows, max_rows, rng)


def bounded_error_sums(predicted: np.ndarray, actual: np.ndarray, clip: float) -> dict[str, float]:
    """Rating-error sums with each row's error clipped to ``[-clip, clip]``."""
    err = clip_values(np.asarray(predicted, np.float64) - actual, clip)
    return {"sse": float(err @ err), "sae": float(np.abs(err).sum()), "n": float(err.size)}


def evaluation_ratios(champion: bool) -> tuple[float, ...]:
    """A private run's evaluation releases, each as its noise multiplier over the training's
    (:func:`~models.privacy.dp.calibrate`'s ``relative``): the final model's (its baseline in the
    same upload) and, with a champion to compare, the champion's."""
    return (EVALUATION_NOISE_RATIO,) * (2 if champion else 1)


def released_noise(
    evaluations: Sequence[Mapping[str, Evaluation]], release: MetricRelease, k: int
) -> dict[str, float]:
    """One standard deviation of the DP noise in each metric that the clients' released sums
    give: ``{"valid/rmse": sd, "valid/mae": sd, "valid/ndcg_at_10": sd, ...}``, to first order
    (the delta method, accurate while the noise is small against the sums; larger figures mean
    the metric is mostly noise).

    ``rmse = sqrt(sse / n)``, ``mae = sae / n`` and ``ndcg_at_k = ndcg / users`` (each ranking
    metric likewise) are computed from
    sums to which every client added independent noise of :meth:`MetricRelease.deviations`, so
    each total's variance is the sum of the clients' variances. Uses only released values and
    the configuration: post-processing.
    """
    totals: dict[tuple[str, str], float] = {}
    variances: dict[tuple[str, str], float] = {}
    for evaluation in evaluations:
        keys = [(s, key) for s in sorted(evaluation) for key in sorted(evaluation[s][0])]
        for key, deviation in release.deviations(keys).items():
            totals[key] = totals.get(key, 0.0) + evaluation[key[0]][0][key[1]]
            variances[key] = variances.get(key, 0.0) + deviation**2
    out: dict[str, float] = {}
    for split in sorted({s for s, _ in totals}):
        rmse_ratio = _ratio_sd(totals, variances, (split, "sse"), (split, "n"))
        if rmse_ratio is not None:
            mean_square = max(totals.get((split, "sse"), 0.0), 0.0) / totals[(split, "n")]
            # where the noisy sse came out at 0 (RMSE 0.0), the first order has no slope: the
            # RMSE that one deviation of the ratio gives stands for it
            out[f"{split}/rmse"] = (
                rmse_ratio / (2 * math.sqrt(mean_square))
                if mean_square > 0
                else math.sqrt(rmse_ratio)
            )
            mae = _ratio_sd(totals, variances, (split, "sae"), (split, "n"))
            if mae is not None:
                out[f"{split}/mae"] = mae
        for key in RANKING_KEYS:
            sd = _ratio_sd(totals, variances, (split, key), (split, "users"))
            if sd is not None:
                out[f"{split}/{key}_at_{k}"] = sd
    return out


def _ratio_sd(
    totals: Mapping[tuple[str, str], float],
    variances: Mapping[tuple[str, str], float],
    top: tuple[str, str],
    bottom: tuple[str, str],
) -> float | None:
    """The deviation of ``top / bottom`` from those of two independent noisy sums (first order)."""
    if top not in totals or bottom not in totals or totals[bottom] <= 0:
        return None
    num, den = totals[top], totals[bottom]
    return math.sqrt(variances[top] / den**2 + variances[bottom] * num**2 / den**4)
