"""Which phases secure aggregation covers and the fewest clients a secure sum may hold, for each
family as the product builds it: every sampled phase is masked, a phase every client answers
once only when the family encodes it densely (the explicit global mean; not the two-stage
model's co-occurrences), and a sum holds at least 2 clients, or under DP as many as share its
noise."""

from __future__ import annotations

import pytest

from models.federation.family import min_secure_threshold, secure_phase
from models.mf.family import ExplicitMF
from models.mf.federated import MFConfig
from models.neural.family import Neural, NeuralConfig
from models.privacy.dp import UserLevelDP
from models.ranking.boosting import RankerConfig
from models.ranking.family import TwoStage
from models.ranking.federated import RankingConfig


def _covered(family) -> dict[str, bool]:
    return {phase.name: secure_phase(family, phase) for phase in family.phases(3)}


def test_the_explicit_familys_mean_and_rounds_are_masked():
    family = ExplicitMF(MFConfig(n_factors=4))

    assert [p.everyone for p in family.phases(3)] == [True, False]
    assert _covered(family) == {"mean": True, "train": True}


def test_the_two_stage_familys_cooccurrences_go_in_the_clear_and_its_rounds_are_masked():
    family = TwoStage(RankingConfig(n_factors=4, ranker=RankerConfig(rounds=2)))

    assert [p.everyone for p in family.phases(3)] == [False, True, False]
    assert _covered(family) == {"als": True, "knn": False, "ranker": True}


def test_the_networks_rounds_are_masked():
    assert _covered(Neural(NeuralConfig())) == {"train": True}


@pytest.mark.parametrize(
    ("family", "threshold"),
    [
        (ExplicitMF(MFConfig(n_factors=4)), 2),
        (TwoStage(RankingConfig(n_factors=4)), 2),
        (Neural(NeuralConfig()), 2),
        (ExplicitMF(MFConfig(n_factors=4, dp=UserLevelDP(1.0, shares=1))), 2),
        (ExplicitMF(MFConfig(n_factors=4, dp=UserLevelDP(1.0, shares=5))), 5),
        (TwoStage(RankingConfig(n_factors=4, ranker=None, dp=UserLevelDP(1.0, shares=3))), 3),
    ],
)
def test_a_secure_sum_holds_two_clients_or_every_noise_share(family, threshold):
    assert min_secure_threshold(family) == threshold
