import pandas as pd
import pytest
from pydantic import ValidationError

from fedrec.config import TrainingConfig
from models.mf.federated import MFConfig
from models.ranking.boosting import RankerConfig
from models.ranking.federated import RankingConfig


def test_defaults_come_from_the_core_and_map_back_to_it():
    config = TrainingConfig()
    mf = config.mf_config()
    assert (mf.n_factors, mf.reg, mf.algorithm) == (
        MFConfig.n_factors,
        MFConfig.reg,
        MFConfig.algorithm,
    )
    assert mf.clip_to == config.rating_scale
    assert (config.registered_name, config.promotion) == ("fedrec-mf", "valid/rmse")
    implicit = TrainingConfig(feedback="implicit").ranking_config()
    core = RankingConfig()
    assert (implicit.n_factors, implicit.reg, implicit.alpha, implicit.ranker) == (
        core.n_factors, core.reg, core.alpha, None,
    )  # fmt: skip
    two_stage = TrainingConfig(feedback="implicit", ranker="lightgbm", factors=16, ranker_trees=3)
    assert two_stage.ranking_config().n_factors == 16
    assert two_stage.ranking_config().ranker.trees_per_round == 3
    assert (two_stage.registered_name, two_stage.promotion) == (
        "fedrec-ranking",
        "select/ndcg_at_10",
    )


def test_each_setting_reaches_the_core_config_it_names():
    """Every flag the MF, neural and ranking families read, each at a value no default has."""
    from models.robust import choose_attackers

    mf = TrainingConfig(
        algorithm="fedprox", factors=7, reg=0.3, local_epochs=3, local_lr=0.02, batch_size=64,
        prox_mu=0.05, server_lr=0.5, top_k=7, relevance_threshold=3.5, rating_scale=(0.5, 5.0),
        aggregation="trimmed_mean", trim=0.1, clip_factor=3.0, attack="scale",
        attack_fraction=0.25, attack_scale=4.0, clients=8, seed=3,
    ).mf_config()  # fmt: skip
    assert mf == MFConfig(
        algorithm="fedprox", n_factors=7, reg=0.3, local_epochs=3, local_lr=0.02, batch_size=64,
        prox_mu=0.05, server_lr=0.5, top_k=7, relevance_threshold=3.5, clip_to=(0.5, 5.0),
        aggregation="trimmed_mean", trim=0.1, clip_factor=3.0, attack="scale",
        attack_clients=choose_attackers(8, 0.25, 3), attack_scale=4.0,
    )  # fmt: skip
    assert len(mf.attack_clients) == 2  # a quarter of 8 clients

    neural = TrainingConfig(
        feedback="implicit", implicit_model="neural", neural_network="dae", neural_hidden=24,
        neural_latent=12, neural_lr=0.005, neural_batch_size=32, neural_local_epochs=2,
        neural_server="fedadam", rounds=4, top_k=7,
    ).neural_config()  # fmt: skip
    assert (neural.kind, neural.hidden, neural.latent, neural.top_k) == ("dae", (24,), 12, 7)
    assert (neural.train.learning_rate, neural.train.batch_size) == (0.005, 32)
    federated = neural.federated
    assert (federated.rounds, federated.local_epochs, federated.server_rule) == (4, 2, "fedadam")
    assert federated.server_lr == 0.01  # FedAdam's own default step without --server-lr
    given = TrainingConfig(feedback="implicit", implicit_model="neural", server_lr=0.2)
    assert given.neural_config().federated.server_lr == 0.2

    ranking = TrainingConfig(
        feedback="implicit", ranker="lightgbm", factors=9, reg=2.5, alpha=7.0, neighbours=17,
        candidates=33, ease_reg=50.0, top_k=6, positive_threshold=2.0, ranker_rounds=4,
        ranker_trees=5, ranker_learning_rate=0.2, ranker_leaves=9, seed=11,
        ranker_objective="lambdarank" if RankerConfig.objective != "lambdarank" else "rank_xendcg",
    )  # fmt: skip
    core = ranking.ranking_config()
    assert (core.n_factors, core.reg, core.alpha, core.neighbours, core.n_candidates) == (
        9, 2.5, 7.0, 17, 33,
    )  # fmt: skip
    assert (core.ease_reg, core.top_k, core.positive_threshold) == (50.0, 6, 2.0)
    ranker = core.ranker
    assert (ranker.rounds, ranker.trees_per_round, ranker.learning_rate, ranker.num_leaves) == (
        4, 5, 0.2, 9,
    )  # fmt: skip
    assert (ranker.objective, ranker.seed) == (ranking.ranker_objective, 11)
    assert ranker.objective != RankerConfig.objective


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ranker": "lightgbm"}, "ranker='lightgbm' needs feedback='implicit'"),
        ({"feedback": "implicit", "algorithm": "fedavg"}, "implicit feedback trains with als"),
        ({"positive_threshold": 3.0}, "positive_threshold needs feedback='implicit'"),
        ({"repeats": "sum"}, "repeats='sum' needs feedback='implicit'"),
        ({"feedback": "implicit", "promotion_metric": "valid/rmse"}, "has no rating error"),
        ({"feedback": "implicit", "ranker": "lightgbm", "promotion_metric": "valid/ndcg_at_10"},
         "learns from the validation rows"),
    ],
)  # fmt: skip
def test_family_combinations_are_checked(fields, message):
    with pytest.raises(ValidationError, match=message):
        TrainingConfig(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"valid_fraction": 0}, r"valid_fraction=0 holds out no validation rows, and a version is "
         r"promoted on valid/rmse: it could never be promoted; allowed: valid_fraction > 0"),
        ({"feedback": "implicit", "ranker": "lightgbm", "valid_fraction": 0},
         "valid_fraction=0 holds out no validation rows, and the re-ranker learns from them"),
        ({"feedback": "implicit", "ranker": "lightgbm", "test_fraction": 0, "promotion_metric": "test/ndcg_at_10"},
         "test_fraction=0 holds out no test rows, and a version is promoted on test/ndcg_at_10"),
        ({"feedback": "implicit", "valid_fraction": 0}, "promoted on valid/ndcg_at_10"),
        ({"promotion_metric": "test/ndcg_at_10", "test_fraction": 0}, "promoted on test/ndcg_at_10"),
    ],
)  # fmt: skip
def test_a_split_without_the_rows_a_run_needs_is_refused(fields, message):
    """A re-ranker with no validation rows failed in every client's task; a version promoted on
    a split that holds out no rows was trained and registered, and could never be promoted."""
    with pytest.raises(ValidationError, match=message):
        TrainingConfig(**fields)


def test_the_promotion_metric_is_at_the_runs_k():
    """A run measures its ranking metrics at top_k only: a metric at another K was never
    measured, and a version promoted on it could never be promoted."""
    implicit = {"feedback": "implicit"}
    assert TrainingConfig(**implicit, top_k=20).promotion == "valid/ndcg_at_20"
    assert TrainingConfig(**implicit, ranker="lightgbm", top_k=5).promotion == "select/ndcg_at_5"
    assert TrainingConfig(**implicit).promotion == "valid/ndcg_at_10"
    chosen = TrainingConfig(**implicit, top_k=20, promotion_metric="test/recall_at_20")
    assert chosen.promotion == "test/recall_at_20"
    with pytest.raises(ValidationError, match=r"promotion_metric='valid/ndcg_at_10': ranking "
                       r"metrics are measured at K = 20 \(top_k\); allowed: valid/ndcg_at_20, "
                       r"or top_k=10"):  # fmt: skip
        TrainingConfig(**implicit, top_k=20, promotion_metric="valid/ndcg_at_10")
    for wrong in ("valid/ndcg", "valid/hit_at_10", "test/rmse", "valid/ndcg_at_0"):
        with pytest.raises(ValidationError, match="is not a promotion metric; allowed: valid/rmse"):
            TrainingConfig(**implicit, promotion_metric=wrong)


def test_a_split_the_run_does_not_need_may_hold_out_no_rows():
    TrainingConfig(test_fraction=0)  # promoted on valid/rmse
    TrainingConfig(feedback="implicit", test_fraction=0)  # retrieval only: valid/ndcg_at_10
    TrainingConfig(valid_fraction=0, promotion_metric="test/ndcg_at_10")
    # a re-ranker is compared on the selection users' validation rows: no test rows needed
    TrainingConfig(feedback="implicit", ranker="lightgbm", test_fraction=0)


def test_a_re_ranker_is_compared_on_the_users_it_did_not_learn_from():
    """The re-ranker's labels are validation rows, so its valid/ metrics flatter it; select/
    metrics (the validation rows of the users it leaves out) exist only when a re-ranker runs."""
    ranked = {"feedback": "implicit", "ranker": "lightgbm"}
    with pytest.raises(ValidationError, match=r"promotion_metric='valid/recall_at_10': the "
                       r"re-ranker learns from the validation rows; allowed: select/recall_at_10 "
                       r"\(the validation rows of the users it leaves out\) or a test/ metric"):  # fmt: skip
        TrainingConfig(**ranked, promotion_metric="valid/recall_at_10")
    assert TrainingConfig(**ranked, promotion_metric="test/map_at_10").promotion == "test/map_at_10"
    with pytest.raises(ValidationError, match=r"select/ metrics are measured with a re-ranker "
                       r"only; allowed: valid/ndcg_at_10, or ranker='lightgbm'"):  # fmt: skip
        TrainingConfig(feedback="implicit", promotion_metric="select/ndcg_at_10")
    with pytest.raises(ValidationError, match="select/ metrics are measured with a re-ranker"):
        TrainingConfig(promotion_metric="select/ndcg_at_10")  # explicit feedback: no re-ranker
    with pytest.raises(ValidationError, match=r"valid_fraction=0 holds out no validation rows"):
        TrainingConfig(**ranked, valid_fraction=0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        # the model would hold the data's exact lowest and highest rating
        ({"rating_scale": "data"}, "rating_scale='data' with dp_epsilon"),
        # one client per key value: the logged number of clients counts the values
        ({"partition": "by-key", "partition_key": "occupation", "clients": None},
         "by-key without --clients under dp_epsilon"),
    ],
)  # fmt: skip
def test_a_private_run_refuses_what_would_release_the_data_exactly(fields, message):
    with pytest.raises(ValidationError, match=message):
        TrainingConfig(dp_epsilon=1.0, **fields)
    TrainingConfig(**fields)  # without DP nothing is promised about them


def test_unknown_keys_and_bad_values_are_rejected():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        TrainingConfig(factorz=3)
    with pytest.raises(ValidationError, match="algorithm"):
        TrainingConfig(algorithm="svd")


def test_rating_scale_is_read_from_a_flag_or_yaml_value():
    assert TrainingConfig(rating_scale="0.5,5").rating_scale == (0.5, 5.0)
    assert TrainingConfig(rating_scale=" 1 , 10 ").rating_scale == (1.0, 10.0)
    assert TrainingConfig(rating_scale="data").rating_scale is None  # taken from the data
    assert TrainingConfig(rating_scale=[0.5, 5]).rating_scale == (0.5, 5.0)
    for bad in ("5", "1,2,3", "low,high"):
        with pytest.raises(ValidationError, match="expected LOW,HIGH"):
            TrainingConfig(rating_scale=bad)


def test_config_hash_ignores_tracking_settings_but_not_training_ones():
    base = TrainingConfig()
    assert base.config_hash() == TrainingConfig(model_name="other", experiment="x").config_hash()
    assert base.config_hash() != TrainingConfig(rounds=11).config_hash()


def test_config_round_trips_through_json_as_prefect_parameters_do():
    config = TrainingConfig(rounds=3, partition="dirichlet")
    assert TrainingConfig.model_validate_json(config.model_dump_json()) == config


def test_the_relevance_threshold_sits_three_quarters_up_a_scale_whose_top_is_below_4():
    from fedrec.config import TrainingConfig

    assert TrainingConfig().relevance_threshold == 4.0  # 1..5: unchanged
    assert TrainingConfig(rating_scale=(1.0, 10.0)).relevance_threshold == 4.0
    assert TrainingConfig(rating_scale="0.5,2.5").relevance_threshold == 2.0
    assert TrainingConfig(rating_scale=(0.0, 1.0)).relevance_threshold == 0.75
    with pytest.raises(
        ValueError, match=r"relevance_threshold 4 is above the rating scale's top 2\.5"
    ):
        TrainingConfig(rating_scale="0.5,2.5", relevance_threshold=4.0)
    # read back from its own dump, a config keeps what it resolved to
    config = TrainingConfig(rating_scale="0.5,2.5")
    assert TrainingConfig(**config.model_dump()).relevance_threshold == 2.0


def test_mlflow_params_hold_the_values_a_run_uses_not_unset_defaults():
    explicit = TrainingConfig().flat_params()
    assert (explicit["factors"], explicit["reg"]) == (
        str(MFConfig().n_factors),
        str(MFConfig().reg),
    )
    assert (explicit["model_name"], explicit["promotion_metric"]) == ("fedrec-mf", "valid/rmse")
    ranking = TrainingConfig(feedback="implicit", ranker="lightgbm").flat_params()
    assert ranking["factors"] == str(RankingConfig().n_factors) and ranking["reg"] != ""
    assert ranking["model_name"] == "fedrec-ranking"
    assert TrainingConfig(factors=7).flat_params()["factors"] == "7"  # given: as given


def test_mlflow_params_hold_only_the_data_settings_a_run_reads(tmp_path):
    synthetic = TrainingConfig(synthetic_users=99).flat_params()
    assert (synthetic["data"], synthetic["synthetic_users"]) == ("synthetic", "99")
    movielens = TrainingConfig(data="ml-100k").flat_params()
    assert movielens["data"] == "ml-100k" and not any(k.startswith("synthetic_") for k in movielens)
    for name in ("train.csv", "test.csv"):
        (tmp_path / name).write_text("user_id,item_id,rating\n1,1,4\n")
    split = TrainingConfig(train=str(tmp_path / "train.csv"), test=str(tmp_path / "test.csv"))
    params = split.flat_params()
    assert params["train"].endswith("train.csv") and params["test"].endswith("test.csv")
    assert "data" not in params and not any(k.startswith("synthetic_") for k in params)
    assert {"clients", "partition", "seed"} <= set(params)  # the run's other settings stay


@pytest.mark.parametrize("field", ["seed", "rounds", "factors", "dp_epsilon", "min_delta"])
def test_true_or_false_is_not_taken_for_a_number(field):
    """YAML's `seed: true` would be the number 1 (another run than the user meant)."""
    with pytest.raises(ValidationError, match=f"{field}\n.*allowed: a number, not true/false"):
        TrainingConfig(**{field: True})
    assert TrainingConfig(warm_start=True).warm_start is True  # a yes/no setting takes one


@pytest.mark.parametrize("field", ["seed", "rounds", "dp_epsilon", "min_delta"])
def test_a_quoted_number_is_not_taken_for_a_number(field):
    """YAML's `rounds: "3"` is text; pydantic would read it as 3 and hide a typing slip."""
    with pytest.raises(ValidationError, match=f"{field}\n.*allowed: a number, not text in quotes"):
        TrainingConfig(**{field: "3"})
    assert TrainingConfig(rounds=3, dp_epsilon=3.0).rounds == 3


def test_repeats_reach_the_rows_a_run_loads(tmp_path):
    from tasks.data import load_interactions

    path = tmp_path / "purchases.csv"
    path.write_text("user_id,item_id\na,x\na,x\na,y\nb,x\na,x\n")
    counts = {}
    for repeats in ("latest", "sum"):
        config = TrainingConfig(data=str(path), feedback="implicit", repeats=repeats, clients=2)
        data, _ = load_interactions.fn(config)
        items = data.item_ids[data.frame["item"].to_numpy()]
        users = data.user_ids[data.frame["user"].to_numpy()]
        counts[repeats] = dict(
            zip(zip(users, items, strict=True), data.frame["rating"], strict=True)
        )
    assert counts["latest"] == {("a", "x"): 1.0, ("a", "y"): 1.0, ("b", "x"): 1.0}
    assert counts["sum"] == {("a", "x"): 3.0, ("a", "y"): 1.0, ("b", "x"): 1.0}


def test_a_re_ranked_run_reads_the_users_side_features_from_the_files_columns(tmp_path):
    """age, gender and occupation columns reach each client as its users' features when the
    model has the re-ranker (an empty cell is unknown); without it they are not read."""
    from tasks.data import load_interactions, plan_clients

    path = tmp_path / "clicks.csv"
    path.write_text(
        "customer,product,age,gender,occupation\n"
        "c1,SKU-1,31,f,nurse\nc1,SKU-2,,,nurse\nc2,SKU-1,,M,\nc3,SKU-3,64,,retired\n"
        "c2,SKU-3,,m,\nc4,SKU-2,,,\nc3,SKU-1,64,,retired\n"
    )
    ranked = {"data": str(path), "user_col": "customer", "item_col": "product",
              "feedback": "implicit", "ranker": "lightgbm", "clients": 2}  # fmt: skip
    data, _ = load_interactions.fn(TrainingConfig(**ranked))
    assert data.user_features is not None
    got = data.user_features.set_axis([str(u) for u in data.user_ids])
    raw = pd.read_csv(path, dtype=str)
    for user, rows in raw.groupby("customer"):
        for column in ("age", "gender", "occupation"):
            values = rows[column].dropna().unique()  # the oracle: the user's one stated value
            value = got.loc[user, column]
            if len(values) == 0:
                assert pd.isna(value), (user, column)
            elif column == "age":
                assert value == float(values[0])
            else:
                assert value == (values[0].upper() if column == "gender" else values[0])
    assert any(n.startswith("user features for the re-ranker: age, gender, occupation (3 of 4")
               for n in data.notes)  # fmt: skip
    for client in plan_clients(data, None, TrainingConfig(**ranked)):
        mine = [str(u) for u in client.user_ids]
        pd.testing.assert_frame_equal(
            client.user_features.reset_index(drop=True),
            got.loc[mine].reset_index(drop=True),
        )
    plain, _ = load_interactions.fn(TrainingConfig(**(ranked | {"ranker": "none"})))
    assert plain.user_features is None


@pytest.mark.parametrize(
    "rows, row, column, value, problem",
    [
        ("c1,x,31,F\nc1,y,abc,F\n", 2, "age", "abc", "is not a valid age"),
        ("c1,x,31,F\nc2,y,200,F\n", 2, "age", 200, "is not a valid age"),
        ("c1,x,31,F\nc2,y,30,X\n", 2, "gender", "X", "is not a valid gender"),
        ("c1,x,31,F\nc2,y,,F\nc1,z,32,F\n", 3, "age", 32.0,
         "differs from 31.0 on row 1 (user 'c1')"),
    ],
)  # fmt: skip
def test_a_side_feature_the_re_ranker_cannot_read_is_refused_naming_its_row(
    tmp_path, rows, row, column, value, problem
):
    from models.data.errors import DataValidationError
    from tasks.data import load_interactions

    path = tmp_path / "clicks.csv"
    path.write_text("user_id,item_id,age,gender\n" + rows)
    config = TrainingConfig(data=str(path), feedback="implicit", ranker="lightgbm", clients=2)
    with pytest.raises(DataValidationError) as caught:
        load_interactions.fn(config)
    err = caught.value
    assert (err.file, err.row, err.line, err.column) == (str(path), row, row + 1, column)
    assert err.value == value and err.problem == problem


def test_split_files_give_each_user_the_side_features_any_of_them_states(tmp_path):
    """An empty cell in one file and a value in another is that value; two values refused."""
    from models.data.errors import DataValidationError
    from tasks.data import load_interactions

    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("user_id,item_id,age\nc1,a,\nc1,b,\nc2,a,30\nc3,b,\nc3,c,\n")
    test.write_text("user_id,item_id,age,gender\nc1,c,,\nc2,b,,F\nc3,a,52,\n")
    config = TrainingConfig(train=str(train), test=str(test), feedback="implicit",
                            ranker="lightgbm", clients=2)  # fmt: skip

    data, _ = load_interactions.fn(config)

    got = data.user_features.set_axis([str(u) for u in data.user_ids])
    assert got.loc[["c1", "c2", "c3"], "age"].tolist()[1:] == [30.0, 52.0]
    assert pd.isna(got.at["c1", "age"]) and got["gender"].tolist().count("F") == 1
    assert got.at["c2", "gender"] == "F"
    test.write_text("user_id,item_id,age\nc2,b,31\n")
    with pytest.raises(
        DataValidationError,
        match=r"value 31\.0 of user 'c2' differs from 30\.0 in an earlier split",
    ):
        load_interactions.fn(config)


@pytest.mark.parametrize("field", ["dp_epsilon", "dp_budget"])
def test_an_infinite_epsilon_is_refused_as_a_setting(field):
    """--dp-epsilon inf reached the ledger, which said the users had spent "0 of inf"."""
    with pytest.raises(ValidationError, match=field):
        TrainingConfig(**{"dp_epsilon": 4.0, field: float("inf")})


def test_split_files_keep_their_rows_splits_and_only_a_missing_validation_file_is_drawn(tmp_path):
    """With --valid every row stays in the file it came from; without it, validation rows are
    drawn from the training rows (the test rows are never touched)."""
    from tasks.data import load_interactions, plan_clients

    users, items = [f"u{u}" for u in range(12)], [f"i{i}" for i in range(8)]
    rows = [(u, i) for k, u in enumerate(users) for i in items[k % 3 :: 1]]
    files = {"train": rows[0::3] + rows[1::3], "valid": rows[2::6], "test": rows[5::6]}
    for name, part in files.items():
        lines = "".join(f"{u},{i}\n" for u, i in part)
        (tmp_path / f"{name}.csv").write_text("user_id,item_id\n" + lines)
    expected = {code: len(files[name]) for code, name in enumerate(files)}

    def counts(**paths: str) -> dict[int, int]:
        config = TrainingConfig(**{k: str(tmp_path / f"{v}.csv") for k, v in paths.items()},
                                feedback="implicit", clients=2, valid_fraction=0.3)  # fmt: skip
        data, split = load_interactions.fn(config)
        frames = [c.frame for c in plan_clients(data, split, config)]
        return pd.concat(frames)["split"].value_counts().to_dict()

    assert counts(train="train", valid="valid", test="test") == expected
    drawn = counts(train="train", test="test")  # no validation file: some training rows
    assert drawn[2] == expected[2] and drawn[1] > 0
    assert drawn[0] + drawn[1] == expected[0]


def test_the_data_fingerprint_follows_the_side_features_only_where_the_re_ranker_reads_them(
    tmp_path,
):
    """A user's changed age is changed data for a model whose re-ranker reads it (the run is
    not skipped as unchanged since the champion), and no change for one that does not."""
    from tasks.data import data_fingerprint, load_interactions

    path = tmp_path / "clicks.csv"

    def fingerprint(age: int, ranker: str) -> str:
        path.write_text(f"user_id,item_id,age\nc1,a,{age}\nc1,b,{age}\nc2,a,30\nc3,b,41\n")
        config = TrainingConfig(data=str(path), feedback="implicit", ranker=ranker, clients=2)
        data, split = load_interactions.fn(config)
        return data_fingerprint(data, config, split)

    assert fingerprint(25, "lightgbm") != fingerprint(26, "lightgbm")
    assert fingerprint(25, "none") == fingerprint(26, "none")
    assert fingerprint(25, "lightgbm") != fingerprint(25, "none")
    without = tmp_path / "plain.csv"  # no side features: the rows' own fingerprint
    without.write_text("user_id,item_id\nc1,a\nc1,b\nc2,a\nc3,b\n")
    config = TrainingConfig(data=str(without), feedback="implicit", ranker="lightgbm", clients=2)
    data, split = load_interactions.fn(config)
    assert data_fingerprint(data, config, split) == data.fingerprint()


def test_per_user_clients_are_cut_into_cohorts_of_at_most_cohort_size_users():
    """Every user is a client; the partitions are the fewest cohorts of at most cohort_size
    users (the last one short), each user in exactly one."""
    from tasks.data import load_interactions, plan_clients

    config = TrainingConfig(partition="per-user", cohort_size=7, synthetic_users=50,
                            synthetic_items=30, synthetic_interactions=600)  # fmt: skip
    data, split = load_interactions.fn(config)
    cohorts = plan_clients(data, split, config)

    sizes = sorted(c.n_users for c in cohorts)
    assert data.n_users == 50 and len(cohorts) == 8  # 7 x 7 users and one more
    assert sizes[-1] <= 7 and sum(sizes) == data.n_users
    users = [str(u) for c in cohorts for u in c.user_ids]
    assert sorted(users) == sorted(str(u) for u in data.user_ids)


def test_implicit_feedback_keeps_the_rows_at_or_above_the_threshold_and_else_every_row(tmp_path):
    from tasks.data import load_interactions

    path = tmp_path / "ratings.csv"
    path.write_text("user_id,item_id,rating\nu1,a,5\nu1,b,2\nu2,a,4\nu2,c,1\nu3,b,3\nu3,c,4\n")

    def rows(**fields) -> int:
        data, _ = load_interactions.fn(TrainingConfig(data=str(path), feedback="implicit",
                                                      clients=2, **fields))  # fmt: skip
        return len(data.frame)

    assert rows(positive_threshold=4.0) == 3
    assert rows() == 6


def test_a_private_run_is_refused_too_many_clients_without_the_number_of_key_values(tmp_path):
    """More clients than values of the partition key: a plain run is told how many values there
    are; a private run is not (the number is not released under dp_epsilon)."""
    from models.data.errors import DataValidationError
    from tasks.data import check_sharding, load_interactions, plan_clients

    path = tmp_path / "ratings.csv"
    path.write_text("user_id,item_id,rating,region\n"
                    + "".join(f"u{u},i{u % 4},4,{'north' if u % 2 else 'south'}\n" for u in range(8)))  # fmt: skip
    plain = TrainingConfig(data=str(path), partition="by-key", partition_key="region", clients=3)
    private = plain.model_copy(update={"dp_epsilon": 4.0})
    data, _ = load_interactions.fn(plain)

    with pytest.raises(DataValidationError) as told:
        check_sharding(data, plain)
    with pytest.raises(DataValidationError, match="how many is not said") as untold:
        check_sharding(data, private)
    said, unsaid = str(told.value), str(untold.value)
    assert "how many is not said" not in said and "distinct values (2)" in said
    assert "2" not in unsaid.replace("dp_epsilon", "")
    with pytest.raises(DataValidationError) as planned:  # the same when the clients are planned
        plan_clients(data, None, private)
    assert str(planned.value) == unsaid


def test_more_clients_than_users_is_refused_naming_the_file():
    from models.data.errors import DataValidationError
    from tasks.data import check_sharding, load_interactions

    config = TrainingConfig(clients=60, synthetic_users=50, synthetic_items=30,
                            synthetic_interactions=600)  # fmt: skip
    data, _ = load_interactions.fn(config)
    with pytest.raises(DataValidationError) as refused:
        check_sharding(data, config)
    assert refused.value.file == data.source and data.source.startswith("synthetic(")
    assert "more clients than the data has users (50)" in str(refused.value)
