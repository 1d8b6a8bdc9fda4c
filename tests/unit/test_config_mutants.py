"""Run settings that depend on each other: the quorum a secure private run starts from, the
re-ranker's network and ADMM SLIM, the network's server step, the rows a run holds out and how
split files enter its hash, and every refused combination with its reason (the split shares' sum
among them)."""

import re

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


# a combination refused, the part of its one-line message that says why, and the nearest
# combination allowed
REFUSED = [
    ({"rating_scale": "5,1"}, "not a valid range", {"rating_scale": "1,5"}),
    (
        {"clients": 2, "min_clients": 3},
        "min_clients=3 exceeds clients=2",
        {"clients": 3, "min_clients": 3},
    ),
    (
        {"valid_fraction": 0.6, "test_fraction": 0.4},
        "test_fraction = 1.0, must be < 1",
        {"valid_fraction": 0.6, "test_fraction": 0.3},
    ),
    ({"rating_scale": "1,1"}, "not a valid range", {"rating_scale": "1,2"}),
    ({"rating_scale": "1,inf"}, "not a valid range", {"rating_scale": "1,10"}),
    (
        {"rating_scale": "1,5", "relevance_threshold": 5.5},
        "above the rating scale's top 5",
        {"rating_scale": "1,5", "relevance_threshold": 5.0},
    ),
    (
        {"partition": "per-user", "algorithm": "fedavg"},
        "per-user trains ALS",
        {"partition": "per-user"},
    ),
    (
        {"partition": "per-user", "secure_aggregation": True},
        "per-user trains ALS",
        {"partition": "per-user"},
    ),
    (
        {"partition": "per-user", "feedback": "implicit", "ranker": "lightgbm"},
        "per-user trains ALS",
        {"partition": "per-user", "feedback": "implicit"},
    ),
    (
        {"dask_address": "tcp://127.0.0.1:1"},
        "--dask-address needs --task-runner dask",
        {"dask_address": "tcp://127.0.0.1:1", "task_runner": "dask"},
    ),
    (
        {"aggregation": "median"},
        "robust rules and attacks",
        {"algorithm": "fedavg", "aggregation": "median"},
    ),
    (
        {"attack": "sign_flip", "clients": 5},
        "robust rules and attacks",
        {"algorithm": "fedavg", "attack": "sign_flip", "clients": 5},
    ),
    (
        {"secure_aggregation": True, "client_fraction": 0.5},
        "with secure_aggregation and no dp_epsilon",
        {"secure_aggregation": True, "client_fraction": 0.5, "dp_epsilon": 1.0},
    ),
    (
        {"dp_ledger_set_cap": True, "dp_epsilon": 1.0},
        "dp_ledger_set_cap needs dp_budget",
        {"dp_ledger_set_cap": True, "dp_epsilon": 1.0, "dp_budget": 5.0},
    ),
    (
        {"feedback": "implicit", "implicit_model": "neural", "ranker": "lightgbm"},
        "has no re-ranker here",
        {"feedback": "implicit", "implicit_model": "neural"},
    ),
    (
        {"feedback": "implicit", "implicit_model": "neural", "dp_epsilon": 1.0},
        "has no DP or secure-aggregation encoding here",
        {"feedback": "implicit", "implicit_model": "neural"},
    ),
    (
        {"feedback": "implicit", "ranker": "lightgbm", "promotion_metric": "valid/ndcg_at_10"},
        "allowed: select/ndcg_at_10 ",
        {"feedback": "implicit", "ranker": "lightgbm", "promotion_metric": "select/ndcg_at_10"},
    ),
    (
        {"feedback": "implicit", "promotion_metric": "select/ndcg_at_10"},
        "allowed: valid/ndcg_at_10, or ranker='lightgbm'",
        {"feedback": "implicit", "promotion_metric": "valid/ndcg_at_10"},
    ),
]


@pytest.mark.parametrize(("refused", "why", "allowed"), REFUSED)
def test_a_combination_is_refused_with_its_reason_and_its_neighbour_allowed(refused, why, allowed):
    with pytest.raises(pydantic.ValidationError, match=re.escape(why)):
        TrainingConfig(**refused)
    TrainingConfig(**allowed)


def test_a_scale_whose_top_is_the_default_threshold_keeps_it():
    assert TrainingConfig(rating_scale="1,4").relevance_threshold == 4.0
    assert TrainingConfig(rating_scale="1,3").relevance_threshold == 2.5  # three quarters up


def test_admm_slim_is_built_for_the_re_ranker_only_and_the_networks_server_step_by_rule():
    implicit = {"feedback": "implicit"}
    assert TrainingConfig(**implicit).ranking_config().slim is None
    assert TrainingConfig(**implicit, ranker="lightgbm").ranking_config().slim.iterations == 40
    no_slim = TrainingConfig(**implicit, ranker="lightgbm", slim_iterations=0)
    assert no_slim.ranking_config().slim is None
    neural = {"feedback": "implicit", "implicit_model": "neural"}
    for rule, lr in (("fedavg", 1.0), ("fedadam", 0.01)):
        config = TrainingConfig(**neural, neural_server=rule).neural_config()
        assert config.federated.server_lr == lr  # plain averaging, or Adam's small step
    given = TrainingConfig(**neural, neural_server="fedadam", server_lr=0.2).neural_config()
    assert given.federated.server_lr == 0.2


def test_split_files_count_by_their_rows_not_their_paths(tmp_path):
    rows = "user_id,item_id,rating\n1,a,4\n2,b,3\n1,b,5\n2,a,2\n"
    for folder in ("may", "june"):
        (tmp_path / folder).mkdir()
        for name in ("train.csv", "test.csv"):
            (tmp_path / folder / f"{folder}-{name}").write_text(rows)

    def config(folder):
        base = tmp_path / folder
        return TrainingConfig(train=str(base / f"{folder}-train.csv"),
                              test=str(base / f"{folder}-test.csv"))  # fmt: skip

    assert config("may").config_hash() == config("june").config_hash()
    assert config("may").config_hash() != TrainingConfig().config_hash()


@pytest.mark.parametrize(
    ("attack", "fraction", "said"),
    [
        ("scale", 0.25, "scale by 25% of the clients, strength 3"),
        ("sign_flip", 0.1, "sign_flip by 10% of the clients"),  # a strength only for scale
        ("scale", 0.0, ""),  # no client attacks
        ("none", 0.5, ""),
    ],
)
def test_a_simulated_attack_is_said_only_when_some_client_attacks(attack, fraction, said):
    """What keeps a model trained under a simulated attack from promotion, and names it."""
    config = TrainingConfig(
        algorithm="fedavg", attack=attack, attack_fraction=fraction, attack_scale=3
    )

    assert config.simulated_attack == said
