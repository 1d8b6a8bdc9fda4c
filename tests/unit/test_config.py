import pytest
from pydantic import ValidationError

from fedrec.config import TrainingConfig
from models.mf.federated import MFConfig


def test_defaults_come_from_the_core_and_map_back_to_it():
    config = TrainingConfig()
    mf = config.mf_config()
    assert (config.factors, config.reg, config.algorithm) == (
        MFConfig.n_factors,
        MFConfig.reg,
        MFConfig.algorithm,
    )
    assert mf.n_factors == config.factors and mf.clip_to == config.rating_scale


def test_unknown_keys_and_bad_values_are_rejected():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        TrainingConfig(factorz=3)
    with pytest.raises(ValidationError, match="algorithm"):
        TrainingConfig(algorithm="svd")


def test_config_hash_ignores_tracking_settings_but_not_training_ones():
    base = TrainingConfig()
    assert base.config_hash() == TrainingConfig(model_name="other", experiment="x").config_hash()
    assert base.config_hash() != TrainingConfig(rounds=11).config_hash()


def test_config_round_trips_through_json_as_prefect_parameters_do():
    config = TrainingConfig(rounds=3, partition="dirichlet")
    assert TrainingConfig.model_validate_json(config.model_dump_json()) == config
