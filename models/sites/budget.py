"""A site's own privacy accountant: what its users have released, counted where their rows are.

In a real federation the coordinator never sees a user id, so it cannot keep the per-user
ledger of :mod:`models.privacy.ledger`; and a site should not take the coordinator's word for
what a run costs. A site therefore counts every DP release it makes itself, from the parameters
it applies, and refuses a release that would take any of its users past the site's cap:

- a **training answer** of a private family is a Gaussian release of the user's clipped
  statistics with noise multiplier ``noise_multiplier / sqrt(shares)`` relative to its
  sensitivity: without secure aggregation the server sees this site's upload alone, so only the
  site's own share of the noise protects it. Under secure aggregation with its peers' keys
  pinned, the site keeps its update and sends it only masked, in a round whose threshold t is
  at least ``shares`` (it checks), so the server learns only sums carrying the full noise: the
  release counts ``noise_multiplier``. With the peers' keys taken from the coordinator, the
  coordinator could stand in for every peer and unmask the update alone: it counts as sent in
  the clear.
  With per-user sampling (``devices``) each user of the site flips its own coin from the site's
  entropy, a Poisson sample at that rate; without it every user is in (a *full* release);
- a **final evaluation** release (:class:`~models.privacy.released_metrics.MetricRelease`) is one
  Gaussian release of every user's bounded sums;
- a **count** release is the site's number of users with Gaussian noise of standard deviation
  :data:`COUNT_NOISE` (one user changes it by 1), what a site that answers only private runs
  sends at enrolment.

A run's epsilon is the composition of its releases (:func:`models.privacy.dp.epsilon`, the
tighter of PLD and RDP) at the site's per-run delta; each release is charged as the increase
it causes, so the charges of a run add up to the run's epsilon. Across runs the charges add up
per user (basic composition, as the coordinator's ledger), with the arithmetic of
:func:`models.privacy.ledger.standing`. A run whose requests change its noise or sampling rate
after its first release is refused: its composition would not be the one counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from models.privacy.dp import UserLevelDP, epsilon
from models.privacy.released_metrics import MetricRelease

ReleaseKind = Literal["round", "full", "evaluation", "count"]

COUNT_NOISE = 10.0  # users: composed with a run's training, about epsilon 0.01 more
#: a site's delta cap across runs unless its operator gives one: a public number, never derived
#: from the site's count of users. What a site has spent is computed at its delta, and whether it
#: refuses a run of a chosen epsilon tells the coordinator which side of the epsilon left that
#: run falls; with a cap of 1 / users, a few runs' epsilons chosen just over and under the
#: epsilon left at neighbouring counts would find the count. A site of more users than
#: ``1 / DEFAULT_MAX_DELTA`` gives its own cap (``--max-delta``, at most 1 / its users).
DEFAULT_MAX_DELTA = 1e-6
RUNS_PER_DELTA_CAP = 10  # the delta cap allows this many runs at the per-run delta
#: the delta each run is counted at under the default cap, which the coordinator of a run over
#: real sites calibrates its noise at too (unless ``--dp-delta`` says otherwise), so that the run's
#: epsilon is what each such site counts for it
SITE_RUN_DELTA = DEFAULT_MAX_DELTA / RUNS_PER_DELTA_CAP


class SiteBudgetError(ValueError):
    """A release the site's cap does not allow, or one it cannot account; one line.

    Its message names what the site's users have spent, for the site's own log. ``public`` is
    the reason the site may post on the Prefect API, for every reader there: which cap a release
    would pass, without the figures of what the site's users have spent.
    """

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(message)
        self.public = message if public is None else public


@dataclass(frozen=True)
class Release:
    """One DP release a site makes: its kind, noise multiplier (against the server) and the
    Poisson sampling rate of its users (1 for a full release or an evaluation)."""

    kind: ReleaseKind
    noise_multiplier: float
    sampling_rate: float = 1.0

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise SiteBudgetError(
                f"noise multiplier {self.noise_multiplier} is not a positive number"
            )
        if not 0 < self.sampling_rate <= 1:
            raise SiteBudgetError(f"sampling rate {self.sampling_rate} is outside (0, 1]")


def training_release(dp: UserLevelDP, devices: float | None, *, masked: bool = False) -> Release:
    """The release of one private training answer at the users' sampling rate: the site's
    noise share, unaided by anyone else's; or, when ``masked`` (secure aggregation: the site
    sends its update only masked, in a round that unmasks only sums of at least ``dp.shares``
    sites), the full noise multiplier the sum carries."""
    sigma = dp.noise_multiplier
    if not masked:
        sigma /= math.sqrt(max(1, dp.shares))
    if devices is None or devices >= 1:
        return Release("full", sigma)
    return Release("round", sigma, devices)


def evaluation_release(release: MetricRelease) -> Release:
    """The release of one private evaluation answer."""
    return Release("evaluation", release.noise_multiplier)


def count_release() -> Release:
    """The release of a site's noisy user count (sensitivity 1, noise :data:`COUNT_NOISE`)."""
    return Release("count", COUNT_NOISE)


def run_epsilon(releases: Sequence[Release], delta: float) -> float:
    """The epsilon, at ``delta``, of one run's releases composed.

    Raises
    ------
    SiteBudgetError
        When the training releases do not share one noise multiplier, or the sampled rounds one
        sampling rate (the accountant composes one such mechanism).
    """
    rounds = [r for r in releases if r.kind == "round"]
    full = [r for r in releases if r.kind == "full"]
    extra = [r.noise_multiplier for r in releases if r.kind in ("evaluation", "count")]
    sigmas = {r.noise_multiplier for r in (*rounds, *full)}
    rates = {r.sampling_rate for r in rounds}
    if len(sigmas) > 1 or len(rates) > 1:
        raise SiteBudgetError(
            "the run changed its training noise or sampling rate after its first release "
            f"(noise multipliers {sorted(sigmas)}, sampling rates {sorted(rates)}): not accounted"
        )
    sigma = sigmas.pop() if sigmas else 1.0  # (unused when there is no training release)
    rate = rates.pop() if rates else 1.0
    return epsilon(sigma, rate, len(rounds), delta, len(full), extra)


def charge(previous: Sequence[Release], release: Release, delta: float) -> float:
    """The epsilon that ``release`` adds to a run that already made ``previous`` releases."""
    return run_epsilon([*previous, release], delta) - run_epsilon(previous, delta)
