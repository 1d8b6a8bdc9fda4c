"""Run settings that depend on each other: the quorum a secure private run starts from, the split
fractions' sum, the re-ranker's network, and the description of the rows a run holds out."""

import pydantic
import pytest

from fedrec.config import SECURE_PRIVATE_QUORUM, TrainingConfig


def test_only_a_secure_and_private_run_defaults_to_the_secure_private_quorum():
    assert TrainingConfig().min_fraction == 0.0
    assert TrainingConfig(secure_aggregation=True).min_fraction == 0.0
    assert TrainingConfig(dp_epsilon=1.0).min_fraction == 0.0
    both = TrainingConfig(secure_aggregation=True, dp_epsilon=1.0)
    assert both.min_fraction == SECURE_PRIVATE_QUORUM and both.min_clients == 2
    given = TrainingConfig(secure_aggregation=True, dp_epsilon=1.0, min_fraction=0.5)
    assert given.min_fraction == 0.5


def test_validation_and_test_shares_must_leave_training_rows():
    TrainingConfig(valid_fraction=0.5, test_fraction=0.49)
    with pytest.raises(pydantic.ValidationError, match="valid_fraction"):
        TrainingConfig(valid_fraction=0.5, test_fraction=0.5)


def test_the_re_ranker_gets_a_network_only_with_network_rounds():
    implicit = {"feedback": "implicit", "ranker": "lightgbm"}
    assert TrainingConfig(**implicit).ranking_config().neural is None
    network = TrainingConfig(**implicit, ranker_network_rounds=1).ranking_config().neural
    assert network is not None and network.federated.rounds == 1


def test_the_held_out_rows_are_described_as_the_run_holds_them_out(tmp_path):
    rows = "user_id,item_id,rating\n1,a,4\n2,b,3\n1,b,5\n2,a,2\n"
    for name in ("train.csv", "test.csv", "valid.csv"):
        (tmp_path / name).write_text(rows)
    train, test, valid = (str(tmp_path / n) for n in ("train.csv", "test.csv", "valid.csv"))
    assert TrainingConfig(valid_fraction=0.2, test_fraction=0.05).held_out_rows() == (
        "random split, validation 0.2, test 0.05"
    )
    assert TrainingConfig(train=train, test=test).held_out_rows() == (
        "split files (validation: 0.1 of training)"
    )
    assert TrainingConfig(train=train, test=test, valid=valid).held_out_rows() == (
        "split files (validation: file)"
    )
