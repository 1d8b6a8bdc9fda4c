"""The one typed configuration of a training run: the flow's parameter, the CLI's flags and the
YAML file's keys are all this model. Defaults of the core's hyperparameters are read from the core
(``MFConfig``, ``generate_synthetic``), so each is written once."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedrec.home import fedrec_home as fedrec_home
from fedrec.inputs import (
    check_sources_exist,
    check_split_files,
    data_sources,
    parse_rating_scale,
)
from models.data.partitions import check_workspace
from models.data.synthetic import generate_synthetic
from models.mf.federated import MFConfig
from models.neural.family import NeuralConfig
from models.neural.training import TrainConfig
from models.privacy.dp import PRIVATE_EXPLICIT, PRIVATE_IMPLICIT, SECURE_PRIVATE_QUORUM
from models.privacy.redaction import redact_uri
from models.ranking.boosting import RankerConfig
from models.ranking.federated import RankingConfig
from models.ranking.slim import SlimConfig
from models.robust import AggregationRule, Attack, choose_attackers

_SYNTHETIC = {
    name: p.default for name, p in inspect.signature(generate_synthetic).parameters.items()
}
_MF = MFConfig()
_RANKING = RankingConfig()
_RANKER = RankerConfig()
# measured on ML-1M (benchmarks/README.md): the one-layer Mult-DAE, client minibatches of 50 users (the
# centralized 500 over 10 clients), Adam 3e-3, L2 2e-5
_NEURAL = NeuralConfig(
    kind="dae", hidden=(), train=TrainConfig(learning_rate=3e-3, batch_size=50, l2=2e-5)
)

Algorithm = Literal["als", "fedavg", "fedprox", "fedadam", "fedyogi"]
# a metric that can decide promotion: a rating error on the validation rows, or a ranking metric
# at the run's K (top_k) on the validation, selection (a re-ranker's) or test rows
PROMOTION_METRIC = re.compile(
    r"^(valid/(rmse|mae)|(valid|select|test)/(ndcg|recall|map)_at_(?P<k>[1-9][0-9]{0,3}))$"
)
PROMOTION_METRICS_ALLOWED = (
    "valid/rmse, valid/mae, or valid/, select/ (with a re-ranker) or test/ ndcg_at_K, "
    "recall_at_K, map_at_K with K the run's top_k (default 10)"
)


# what a registered model's name may hold: '/', '@' and ':' would break models:/NAME@ALIAS URIs
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def _numeric(annotation: object) -> bool:
    """Whether a field's type is a number (``int``, ``float``, optionally None)."""
    options = set(get_args(annotation)) - {type(None)} if get_origin(annotation) else {annotation}
    return bool(options) and options <= {int, float}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def scaled_threshold(low: float, high: float) -> float:
    """The relevance threshold of a rating scale whose top is below the default's 4: as 4 sits
    on 1..5, three quarters of the way up."""
    return low + 0.75 * (high - low)


class TrainingConfig(BaseModel):
    """A federated training run: data, sharding, the algorithm, tracking and promotion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # data
    data: str = Field(
        "synthetic",
        description="'synthetic', 'ml-100k'/'ml-1m' (under FEDREC_DATASETS), a MovieLens folder, or a CSV/Parquet file",
    )
    train: str | None = Field(None, description="explicit training file (then --test is required)")
    valid: str | None = Field(None, description="explicit validation file (optional with --train)")
    test: str | None = Field(None, description="explicit test file (with --train)")
    catalogue: str | None = Field(
        None,
        description="a CSV file whose item column (as --item-col names it, else item_id) lists the items the model covers, rated "
        "or not; rows of other items are left out. A private run's model then lists these items, "
        "not the ones the rows touch (default under --dp-epsilon: the dataset's own public item "
        "list, which MovieLens and the synthetic data have; other files have none)",
    )
    user_col: str = Field("user_id", description="user column of CSV/Parquet input")
    item_col: str = Field("item_id", description="item column of CSV/Parquet input")
    rating_col: str | None = Field(
        "rating", description="rating column; absent means implicit feedback"
    )
    timestamp_col: str | None = Field("timestamp", description="timestamp column (optional)")
    rating_scale: tuple[float, float] | None = Field(
        (1.0, 5.0),
        description="allowed ratings, LOW,HIGH (e.g. 0.5,5), or 'data' to take them from the data",
    )
    synthetic_users: int = Field(
        _SYNTHETIC["n_users"], ge=2, description="users of the synthetic data"
    )
    synthetic_items: int = Field(
        _SYNTHETIC["n_items"], ge=2, description="items of the synthetic data"
    )
    synthetic_interactions: int = Field(
        _SYNTHETIC["n_interactions"], ge=10, description="rows of the synthetic data"
    )
    synthetic_taste: float = Field(
        _SYNTHETIC["taste"],
        gt=0,
        description="synthetic data: how strongly what a user meets follows taste, not popularity",
    )
    synthetic_seed: int = Field(
        _SYNTHETIC["seed"],
        ge=0,
        description="seed of the synthetic data (--seed varies the training, not the data)",
    )

    # sharding and splits
    clients: int | None = Field(
        10,
        ge=1,
        description="number of clients (with --partition by-key, `clients: null` in the --config "
        "file gives one client per key value; not under DP, where their number is not released)",
    )
    partition: Literal["iid", "dirichlet", "by-key", "per-user"] = Field(
        "iid",
        description="how users are assigned to clients; per-user: every user is a client "
        "(cross-device), simulated in cohorts of --cohort-size, --clients is ignored",
    )
    cohort_size: int = Field(
        500,
        ge=1,
        description="per-user: clients simulated by one task, vectorised (the aggregate does not depend on it)",
    )
    dirichlet_alpha: float = Field(
        0.3, gt=0, description="non-IID concentration for --partition dirichlet"
    )
    partition_key: str | None = Field(
        None,
        description="--partition by-key: the column whose values make the clients: a column of "
        "a CSV/Parquet file that describes the user (one value per user, e.g. region), or a "
        "user feature of MovieLens (occupation, zip, ...) and the synthetic data (region, ...)",
    )
    key_prefix: int | None = Field(
        None, ge=1, description="leading characters of the key to use (e.g. 1 for zip)"
    )
    split: Literal["random", "temporal"] = Field(
        "random", description="how each client holds out rows"
    )
    valid_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of each client's rows for validation"
    )
    test_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of each client's rows for test"
    )

    # training
    feedback: Literal["explicit", "implicit"] = Field(
        "explicit",
        description="explicit: predict ratings (MF); implicit: rank items (implicit ALS, item-kNN, optional re-ranker)",
    )
    positive_threshold: float | None = Field(
        None,
        description="implicit: keep rows with rating >= this as positives (default: every row)",
    )
    repeats: Literal["latest", "sum"] = Field(
        "latest",
        description="rows of one (user, item) in a file: latest keeps the last (a changed "
        "rating); sum (implicit) adds their ratings, so repeat purchases count (each row 1 "
        "without a rating column)",
    )
    algorithm: Algorithm = Field(
        _MF.algorithm, description="als (exact), fedavg, fedprox, fedadam, fedyogi (explicit only)"
    )
    factors: int | None = Field(
        None,
        ge=1,
        description=f"latent factors k (default: {_MF.n_factors} explicit, "
        f"{PRIVATE_EXPLICIT.n_factors} explicit with --dp-epsilon, {_RANKING.n_factors} implicit)",
    )
    reg: float | None = Field(
        None,
        gt=0,
        description=f"L2 regularisation (default: {_MF.reg} weighted-lambda explicit, {_RANKING.reg} implicit)",
    )
    alpha: float = Field(_RANKING.alpha, gt=0, description="implicit confidence c = 1 + alpha")
    neighbours: int = Field(
        _RANKING.neighbours, ge=1, description="implicit: item-kNN neighbours kept per item"
    )
    candidates: int = Field(
        _RANKING.n_candidates,
        ge=1,
        description="implicit: top-N of each retrieval model to re-rank",
    )
    implicit_model: Literal["two-stage", "neural"] = Field(
        "two-stage",
        description="implicit: the model family; two-stage: implicit ALS + item-kNN retrieval "
        "(+ the re-ranker); neural: a Mult-DAE/Mult-VAE network trained by FedAvg/FedAdam",
    )
    neural_network: Literal["dae", "vae"] = Field(
        _NEURAL.kind, description="neural: Mult-DAE or Mult-VAE (Liang et al. 2018)"
    )
    neural_latent: int = Field(_NEURAL.latent, ge=1, description="neural: latent width")
    neural_hidden: int = Field(
        _NEURAL.hidden[0] if _NEURAL.hidden else 0,
        ge=0,
        description="neural: hidden width between input and latent (0: none)",
    )
    neural_lr: float = Field(
        _NEURAL.train.learning_rate, gt=0, description="neural: clients' Adam step size"
    )
    neural_batch_size: int = Field(
        _NEURAL.train.batch_size, ge=1, description="neural: users per client minibatch"
    )
    neural_local_epochs: int = Field(
        _NEURAL.federated.local_epochs, ge=1, description="neural: client epochs per round"
    )
    neural_server: Literal["fedavg", "fedadam"] = Field(
        _NEURAL.federated.server_rule, description="neural: the server step"
    )
    ranker: Literal["none", "lightgbm"] = Field(
        "none",
        description="implicit: re-rank retrieval candidates with a federated LightGBM ranker "
        "(it also reads the data's age, gender and occupation columns, where there are any)",
    )
    ranker_rounds: int = Field(
        _RANKER.rounds, ge=1, description="federated rounds of the re-ranker"
    )
    ranker_trees: int = Field(
        _RANKER.trees_per_round, ge=1, description="trees each client boosts per re-ranker round"
    )
    ranker_learning_rate: float = Field(
        _RANKER.learning_rate, gt=0, le=1, description="re-ranker shrinkage"
    )
    ranker_leaves: int = Field(_RANKER.num_leaves, ge=2, description="leaves per re-ranker tree")
    ranker_objective: Literal["lambdarank", "rank_xendcg"] = Field(
        _RANKER.objective,
        description="the re-ranker's listwise objective (XE-NDCG: above LambdaRank on held-out "
        "ML-1M validation users and on ML-1M's test rows)",
    )
    ranker_network_rounds: int = Field(
        0,
        ge=0,
        description="implicit two-stage: FedAvg rounds of a Mult-DAE network (the neural_* "
        "settings) trained after the co-occurrence round, as a candidate source and re-ranker "
        "features; 0: no network",
    )
    ease_reg: float = Field(
        800.0,
        ge=0,
        description="implicit two-stage: EASE's ridge, for candidates and re-ranker features from "
        "the same co-occurrence sums as item-kNN (picked on ML-1M validation); 0 turns EASE off",
    )
    slim_iterations: int = Field(
        SlimConfig.iterations,
        ge=0,
        description="implicit two-stage with --ranker lightgbm: ADMM iterations of ADMM SLIM "
        "(RecBole's ML-1M settings), whose scores of the candidates are re-ranker features, from "
        "the same co-occurrence sums as item-kNN; each costs the server one item x item matrix "
        "product (0.65 s on ML-1M's 3,706 items); 0: no SLIM",
    )
    rounds: int = Field(
        10,
        ge=1,
        description="federated rounds (default: 10; with --dp-epsilon: "
        f"{PRIVATE_EXPLICIT.rounds} for explicit feedback, {PRIVATE_IMPLICIT.rounds} for implicit)",
    )
    client_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of clients sampled per round (per-user: each user's own seeded coin)",
    )
    eval_every: int = Field(
        1,
        ge=1,
        description="evaluate the model on every client every N rounds (always after the last round)",
    )
    task_runner: Literal["thread", "dask"] = Field(
        "thread",
        description="where client tasks run: threads of this process, or Dask workers (prefect-dask)",
    )
    dask_address: str | None = Field(
        None,
        description="a running Dask scheduler (tcp://host:8786); default: a local cluster of 2 worker processes",
    )
    min_clients: int = Field(
        1,
        ge=1,
        description="quorum: fewest clients whose updates a round needs (default: 1; with "
        "--secure-aggregation: 2, the fewest its sums need)",
    )
    local_epochs: int = Field(
        _MF.local_epochs, ge=1, description="local SGD epochs (SGD algorithms)"
    )
    local_lr: float = Field(_MF.local_lr, gt=0, description="local SGD learning rate")
    batch_size: int = Field(_MF.batch_size, ge=1, description="local SGD minibatch size")
    prox_mu: float = Field(_MF.prox_mu, ge=0, description="FedProx proximal coefficient")
    server_lr: float | None = Field(
        _MF.server_lr,
        gt=0,
        description="server step (default: 1 for averaging, adaptive rules lower)",
    )
    aggregation: AggregationRule = Field(
        _MF.aggregation,
        description="how the averaging algorithms combine client updates (robust rules resist "
        "poisoned ones; screened_mean leaves out the clients farthest from the median)",
    )
    trim: float = Field(
        _MF.trim,
        ge=0,
        lt=0.5,
        description="share of a round's clients the robust rules assume malicious: the clients "
        "screened_mean leaves out and the values trimmed_mean drops at each end",
    )
    clip_factor: float = Field(
        _MF.clip_factor,
        gt=0,
        description="norm bound as a multiple of the round's median (norm_clip)",
    )
    attack: Attack = Field(
        _MF.attack, description="simulation: what malicious clients send instead of their update"
    )
    attack_fraction: float = Field(
        0.0, ge=0, le=1, description="simulation: share of clients that attack (a seeded choice)"
    )
    attack_scale: float = Field(_MF.attack_scale, gt=0, description="simulation: attack strength")
    top_k: int = Field(_MF.top_k, ge=1, description="K of the top-K metrics")
    relevance_threshold: float | None = Field(
        _MF.relevance_threshold, description="held-out ratings >= this are relevant"
    )
    seed: int = Field(0, ge=0, description="one seed for sharding, initialisation and sampling")
    task_retries: int = Field(2, ge=0, description="retries of a failed client task")
    retry_backoff: float = Field(
        1.0, ge=0, description="first retry delay in seconds, doubling with each retry"
    )
    min_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="quorum: least share of a round's sampled clients that must answer (default: "
        f"0; with --secure-aggregation and --dp-epsilon: {SECURE_PRIVATE_QUORUM}, the share the "
        "clients' noise is sized for)",
    )
    round_timeout: float | None = Field(
        None,
        gt=0,
        description="seconds a round waits for its clients; later answers are left out (with "
        "--sites: also each site's deadline, unless the sites file gives it one)",
    )
    round_retries: int = Field(
        1, ge=0, description="times a round short of its quorum asks the missing clients again"
    )
    fault_probability: float = Field(
        0.0, ge=0, le=1, description="simulation: chance that a client task fails"
    )
    fault_delay: float = Field(
        0.0, ge=0, description="simulation: mean extra seconds (exponential) a client task takes"
    )
    fault_clients: tuple[int, ...] = Field(
        (), description="simulation: clients whose tasks always fail"
    )
    fault_dropout_clients: tuple[int, ...] = Field(
        (), description="simulation: clients that vanish after sharing keys (secure aggregation)"
    )
    dp_epsilon: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="user-level differential privacy: the whole training's epsilon (explicit als, "
        "or implicit als without a re-ranker). The users' cap across runs is --dp-budget, set at "
        "their first private run and this epsilon unless given: that run then spends it all",
    )
    dp_delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="DP delta, at most 1 / number of users (the default; usually far below it)",
    )
    dp_max_items: int = Field(
        PRIVATE_IMPLICIT.max_items,
        ge=1,
        description="DP: a user's rows count as at most this many per round (default: "
        f"{PRIVATE_EXPLICIT.max_items} for explicit feedback, {PRIVATE_IMPLICIT.max_items} for "
        "implicit)",
    )
    dp_budget: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="DP: cap on the total epsilon these users may spend across runs, stored in "
        "the privacy ledger at their first private run (default then: this run's epsilon) and "
        "enforced from then on",
    )
    dp_budget_delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="DP: cap on the total delta, stored like --dp-budget (default then: this "
        "run's delta times --dp-budget / --dp-epsilon, as many runs as the epsilon cap allows)",
    )
    dp_ledger_set_cap: bool = Field(
        False,
        description="operator: store --dp-budget/--dp-budget-delta as these users' new cap (an "
        "entry in the ledger; what was spent stays spent)",
    )
    dp_ledger_secret: str | None = Field(
        None,
        description="DP: file holding the privacy ledger's secret, which names users in the ledger "
        "(default: beside a SQLite store, else FEDREC_HOME/.fedrec-ledger.key; created at first "
        "use; every machine training on the same store needs a copy)",
    )
    secure_aggregation: bool = Field(
        False,
        description="clients send only masked updates (SecAgg: secret-shared masks, signed keys); "
        "the server learns only the sum of at least t >= 2 clients",
    )
    warm_start: bool = Field(
        False, description="start from the champion's item parameters (new items start fresh)"
    )
    skip_if_unchanged: bool = Field(
        True, description="register nothing when data and config equal the champion's"
    )

    # tracking, registry, promotion
    experiment: str = Field("fedrec", min_length=1, description="MLflow experiment")
    model_name: str | None = Field(
        None,
        description="registered model name (default: fedrec-mf explicit, fedrec-ranking implicit, "
        "fedrec-neural for --implicit-model neural)",
    )
    tracking_uri: str | None = Field(
        None, description="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite under FEDREC_HOME)"
    )
    promotion_metric: str | None = Field(
        None,
        pattern=PROMOTION_METRIC.pattern,  # in the deployment's parameter schema too
        description="metric that decides promotion (default: valid/rmse explicit, valid/ndcg_at_K "
        "implicit, select/ndcg_at_K with a re-ranker: the validation rows of the fifth of the "
        "users it does not learn from; K is --top-k)",
    )
    min_delta: float = Field(
        0.0, ge=0, description="least improvement over the champion to promote"
    )
    max_client_regression: float = Field(
        0.05, ge=0, description="how much worse the worst client may get"
    )
    resume: str | None = Field(
        None,
        description="MLflow run id of an interrupted training: continue it from its last complete round",
    )
    workspace: str | None = Field(
        None,
        description="folder for client partitions and checkpoints (default: FEDREC_HOME/workspaces/<MLflow run id>)",
    )
    keep_workspace: bool = Field(
        False,
        description="keep the workspace after the run succeeds (a failed or interrupted run "
        "always keeps it, for --resume, except a run with --sites, which is trained again, not "
        "resumed); with --sites, keep the workspace and the run's exchange files in the artifact "
        "store however the run ends (removed at the run's end otherwise: every site can read "
        "the files)",
    )
    sites: str | None = Field(
        None,
        description="sites.yaml: train with real sites (their processes hold the data) instead "
        "of simulated clients (--data and the partition flags are refused with it). Needs "
        "PREFECT_API_URL and --tracking-uri http://... naming the servers the sites connect to "
        "(`fedrec stores start` prints both); a site is waited for up to its deadline_seconds, "
        "else --round-timeout, else 600 s",
    )

    @field_validator("model_name")
    @classmethod
    def _check_model_name(cls, value: str | None) -> str | None:
        if value is not None and not MODEL_NAME.fullmatch(value):
            raise ValueError(
                f"model_name={value!r}: allowed: letters, digits, '.', '_' and '-', starting with "
                "a letter or digit (the name is part of models:/NAME@champion)"
            )
        return value

    @field_validator("promotion_metric", mode="before")
    @classmethod
    def _check_promotion_metric(cls, value: object) -> object:
        if isinstance(value, str) and not PROMOTION_METRIC.fullmatch(value):
            raise ValueError(f"is not a promotion metric; allowed: {PROMOTION_METRICS_ALLOWED}")
        return value

    @field_validator("workspace")
    @classmethod
    def _check_workspace(cls, value: str | None) -> str | None:
        if value is not None:
            check_workspace(value)
        return value

    @field_validator("rating_scale", mode="before")
    @classmethod
    def _parse_rating_scale(cls, value: object) -> object:
        scale = parse_rating_scale(value)
        if isinstance(scale, list | tuple) and len(scale) == 2:
            low, high = (float(bound) for bound in scale)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(
                    f"rating_scale {tuple(scale)!r} is not a valid range; allowed: LOW,HIGH, "
                    "finite, with LOW < HIGH (e.g. 1,5)"
                )
        return scale

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: object, info: ValidationInfo) -> object:
        """A number field takes a number: ``seed: true`` in a YAML file would otherwise be the
        number 1, and ``rounds: "3"`` (quoted, so text) the number 3."""
        name = info.field_name
        if name is None or not _numeric(cls.model_fields[name].annotation):
            return value
        if isinstance(value, bool):
            raise ValueError("allowed: a number, not true/false")
        if isinstance(value, str) and _is_number(value):
            raise ValueError("allowed: a number, not text in quotes")
        return value

    @model_validator(mode="before")
    @classmethod
    def _resolve_defaults(cls, data: object) -> object:
        """Fields not given whose default depends on the mode: a private run's rounds and rows per
        user (``models.privacy.dp``), and secure aggregation's quorum. A configuration dumped
        and read back holds every field, so it keeps what it resolved to."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        private = data.get("dp_epsilon") is not None
        secure = bool(data.get("secure_aggregation"))
        defaults = PRIVATE_IMPLICIT if data.get("feedback") == "implicit" else PRIVATE_EXPLICIT
        if private:
            data.setdefault("rounds", defaults.rounds)
            data.setdefault("dp_max_items", defaults.max_items)
        if secure:
            data.setdefault("min_clients", 2)
        if secure and private:
            data.setdefault("min_fraction", SECURE_PRIVATE_QUORUM)
        if "relevance_threshold" not in data and data.get("rating_scale") is not None:
            try:
                low, high = parse_rating_scale(data["rating_scale"]) or (None, None)
            except (TypeError, ValueError):  # reported by the field's own check
                low = high = None
            default = _MF.relevance_threshold
            if high is not None and default is not None and low < high < default:
                data["relevance_threshold"] = scaled_threshold(low, high)  # (a bad range is
                # reported by the scale's own check)
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainingConfig:
        top = None if self.rating_scale is None else self.rating_scale[1]
        if (
            self.relevance_threshold is not None
            and top is not None
            and self.relevance_threshold > top
        ):
            raise ValueError(
                f"relevance_threshold {self.relevance_threshold:g} is above the rating scale's top "
                f"{top:g}: no held-out rating could be relevant, and the ranking metrics would be "
                f"empty; allowed: a threshold <= {top:g}"
            )
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"valid_fraction + test_fraction = {self.valid_fraction + self.test_fraction}, must be < 1"
            )
        check_split_files(train=self.train, valid=self.valid, test=self.test)
        if self.train is not None and self.data != "synthetic":
            raise ValueError(
                f"data={self.data!r} with train and test files: the run would read only the "
                "split files; give --data, or --train and --test, not both"
            )
        self._check_held_out_rows()
        if self.partition == "by-key" and self.partition_key is None:
            raise ValueError("--partition by-key needs --partition-key (a user-feature column)")
        if self.sites is not None:
            _check_sites(self)
        elif self.partition not in ("by-key", "per-user") and self.clients is None:
            raise ValueError(f"--partition {self.partition} needs --clients")
        if self.partition == "per-user" and (
            self.algorithm != "als" or self.ranker != "none" or self.secure_aggregation
        ):
            raise ValueError(
                "--partition per-user trains ALS without a re-ranker or secure aggregation: "
                "their per-client statistics are sums a cohort computes for all its users at once"
            )
        if self.dask_address is not None and self.task_runner != "dask":
            raise ValueError("--dask-address needs --task-runner dask")
        if (
            self.partition != "per-user"
            and self.clients is not None
            and self.min_clients > self.clients
        ):
            raise ValueError(f"min_clients={self.min_clients} exceeds clients={self.clients}")
        if self.feedback == "implicit" and self.algorithm != "als":
            raise ValueError(
                f"algorithm={self.algorithm!r} with feedback='implicit': implicit feedback trains with als"
            )
        if self.algorithm == "als" and (self.aggregation != "mean" or self.attack != "none"):
            raise ValueError(
                f"aggregation={self.aggregation!r}, attack={self.attack!r} with algorithm='als': "
                "robust rules and attacks apply to fedavg, fedprox, fedadam, fedyogi"
            )
        if self.attack != "none" and self.clients is None:
            raise ValueError("attack simulation needs --clients (a fixed number of clients)")
        if self.secure_aggregation and self.aggregation != "mean":
            raise ValueError(
                "secure_aggregation covers aggregation='mean' "
                "(a robust rule needs the individual updates the server must not see)"
            )
        if self.secure_aggregation and self.ranker != "none":
            raise ValueError(
                "secure_aggregation with ranker='lightgbm': trees cannot be summed under masks, so "
                "each client's trees would reach the server in the clear; use --ranker none"
            )
        if self.secure_aggregation and self.dp_epsilon is None and self.client_fraction < 1:
            raise ValueError(
                f"client_fraction={self.client_fraction:g} with secure_aggregation and no "
                "dp_epsilon: each round would sum another set of clients, and the server can "
                "solve such sums for one client's update (exactly for what it sends every round: "
                "its per-item counts and row count); use --client-fraction 1, or add --dp-epsilon"
            )
        if self.secure_aggregation and self.min_clients < 2:
            raise ValueError(
                f"min_clients={self.min_clients} with secure_aggregation: a round of one client "
                "reveals its update; use --min-clients 2 or more"
            )
        if self.dp_epsilon is not None and self.algorithm != "als":
            raise ValueError("dp_epsilon: differential privacy is implemented for als")
        if self.dp_epsilon is not None and self.ranker != "none":
            raise ValueError(
                "dp_epsilon with ranker='lightgbm': differential privacy covers implicit ALS only "
                "(item-kNN and the re-ranker have no DP mechanism); use --ranker none"
            )
        if (
            self.dp_epsilon is not None
            and self.feedback == "explicit"
            and self.rating_scale is None
        ):
            raise ValueError(
                "rating_scale='data' with dp_epsilon: the model would hold the data's lowest and "
                "highest rating exactly, and one user's rare rating can move them (DP does not "
                "cover that); give the scale: --rating-scale LOW,HIGH (e.g. 1,5)"
            )
        if self.dp_epsilon is not None and self.partition == "by-key" and self.clients is None:
            raise ValueError(
                "--partition by-key without --clients under dp_epsilon: one client per value of "
                f"{self.partition_key!r} would log how many values the data has, and one user "
                "with a value of their own adds a client (DP does not cover that); give --clients N"
            )
        if self.dp_budget is not None and self.dp_epsilon is None:
            raise ValueError("dp_budget needs dp_epsilon")
        if self.dp_budget_delta is not None and self.dp_epsilon is None:
            raise ValueError("dp_budget_delta needs dp_epsilon")
        if self.dp_ledger_set_cap and self.dp_budget is None:
            raise ValueError("dp_ledger_set_cap needs dp_budget (and dp_epsilon): the cap to store")
        if self.ranker != "none" and self.feedback != "implicit":
            raise ValueError(f"ranker={self.ranker!r} needs feedback='implicit'")
        if self.ranker_network_rounds and self.ranker == "none":
            raise ValueError(
                f"ranker_network_rounds={self.ranker_network_rounds}: the network feeds the "
                "re-ranker; use --ranker lightgbm or 0 rounds"
            )
        if self.implicit_model == "neural":
            if self.feedback != "implicit":
                raise ValueError("implicit_model='neural' needs feedback='implicit'")
            for name, value, allowed in (
                ("ranker", self.ranker, "none"),
                ("dp_epsilon", self.dp_epsilon, None),
                ("secure_aggregation", self.secure_aggregation, False),
            ):
                if value != allowed:
                    raise ValueError(
                        f"{name}={value!r} with implicit_model='neural': the network has no "
                        f"{'re-ranker' if name == 'ranker' else 'DP or secure-aggregation encoding'} "
                        "here; use the two-stage model"
                    )
        if self.positive_threshold is not None and self.feedback != "implicit":
            raise ValueError("positive_threshold needs feedback='implicit'")
        if self.repeats == "sum" and self.feedback != "implicit":
            raise ValueError(
                "repeats='sum' needs feedback='implicit': a sum of a user's ratings of one item "
                "is no rating"
            )
        metric = self.promotion_metric
        if metric is not None:
            k = PROMOTION_METRIC.fullmatch(metric).group("k")  # type: ignore[union-attr]
            if k is not None and int(k) != self.top_k:
                raise ValueError(
                    f"promotion_metric={metric!r}: ranking metrics are measured at K = "
                    f"{self.top_k} (top_k); allowed: {metric.removesuffix('_at_' + k)}_at_"
                    f"{self.top_k}, or top_k={k}"
                )
            if self.feedback == "implicit" and metric.endswith(("rmse", "mae")):
                raise ValueError(
                    f"promotion_metric={metric!r}: implicit feedback has no rating error; use a ranking metric"
                )
            if self.ranker != "none" and metric.startswith("valid/"):
                raise ValueError(
                    f"promotion_metric={metric!r}: the re-ranker learns from the validation rows; "
                    f"allowed: {metric.replace('valid/', 'select/', 1)} (the validation rows of "
                    "the users it leaves out) or a test/ metric"
                )
            if self.ranker == "none" and metric.startswith("select/"):
                raise ValueError(
                    f"promotion_metric={metric!r}: select/ metrics are measured with a re-ranker "
                    f"only; allowed: {metric.replace('select/', 'valid/', 1)}, or ranker='lightgbm'"
                )
        # A mistyped path fails here, before any server, run or task starts.
        check_sources_exist(
            data_sources(data=self.data, train=self.train, valid=self.valid, test=self.test)
        )
        return self

    def _check_held_out_rows(self) -> None:
        """Refuse a split that holds out no rows of what the run needs: the re-ranker's labels
        (validation rows), or the split its promotion metric compares on (a version that could
        never be promoted)."""
        held = {
            "valid": self.valid is not None or self.valid_fraction > 0,
            "test": self.test is not None or self.test_fraction > 0,
        }
        if self.feedback == "implicit" and self.ranker != "none" and not held["valid"]:
            raise ValueError(
                "valid_fraction=0 holds out no validation rows, and the re-ranker learns from "
                "them; allowed: valid_fraction > 0 (or a valid file), or ranker='none'"
            )
        split = self.promotion.split("/")[0]
        split = "valid" if split == "select" else split  # the selection users' validation rows
        if split in held and not held[split]:
            rows = "validation" if split == "valid" else split
            raise ValueError(
                f"{split}_fraction=0 holds out no {rows} rows, and a version is promoted on "
                f"{self.promotion}: it could never be promoted; allowed: {split}_fraction > 0 "
                f"(or a {split} file)"
            )

    @property
    def registered_name(self) -> str:
        """The registered model's name: ``model_name``, else one per model family."""
        if self.model_name:
            return self.model_name
        if self.feedback == "explicit":
            return "fedrec-mf"
        return "fedrec-neural" if self.implicit_model == "neural" else "fedrec-ranking"

    @property
    def simulated_attack(self) -> str:
        """What the run's simulated attack does, in words (``""``: none). A model trained under
        one is registered for inspection and never promoted."""
        if self.attack == "none" or self.attack_fraction == 0:
            return ""
        share = f"{self.attack_fraction:.0%} of the clients"
        strength = f", strength {self.attack_scale:g}" if self.attack == "scale" else ""
        return f"{self.attack} by {share}{strength}"

    @property
    def promotion(self) -> str:
        """The metric that decides promotion (``promotion_metric`` or the family's default)."""
        if self.promotion_metric is not None:
            return self.promotion_metric
        if self.feedback == "explicit":
            return "valid/rmse"
        return f"{'select' if self.ranker != 'none' else 'valid'}/ndcg_at_{self.top_k}"

    def ranking_config(self) -> RankingConfig:
        """The core's hyperparameters of the implicit-feedback (ranking) family."""
        ranker = None
        if self.ranker == "lightgbm":
            ranker = RankerConfig(
                rounds=self.ranker_rounds,
                trees_per_round=self.ranker_trees,
                learning_rate=self.ranker_learning_rate,
                num_leaves=self.ranker_leaves,
                objective=self.ranker_objective,
                seed=self.seed,
            )
        network = None
        if self.ranker_network_rounds > 0:
            neural = self.neural_config()
            federated = replace(neural.federated, rounds=self.ranker_network_rounds)
            network = replace(neural, federated=federated)
        return RankingConfig(
            n_factors=self.factors or _RANKING.n_factors,
            reg=self.reg or _RANKING.reg,
            alpha=self.alpha,
            neighbours=self.neighbours,
            n_candidates=self.candidates,
            ease_reg=self.ease_reg or None,
            # ADMM SLIM gives the re-ranker features only: without a ranker it is not built
            slim=SlimConfig(iterations=self.slim_iterations)
            if self.slim_iterations and ranker is not None
            else None,
            neural=network,
            top_k=self.top_k,
            ranker=ranker,
            positive_threshold=self.positive_threshold,
        )

    def neural_config(self) -> NeuralConfig:
        """The core's hyperparameters of the neural family."""
        hidden = (self.neural_hidden,) if self.neural_hidden else ()
        train = replace(
            _NEURAL.train, learning_rate=self.neural_lr, batch_size=self.neural_batch_size
        )
        federated = replace(
            _NEURAL.federated,
            rounds=self.rounds,
            local_epochs=self.neural_local_epochs,
            server_rule=self.neural_server,
            server_lr=self.server_lr or (1.0 if self.neural_server == "fedavg" else 0.01),
        )
        return NeuralConfig(self.neural_network, hidden, self.neural_latent, train, federated,
                            self.top_k)  # fmt: skip

    def mf_config(self) -> MFConfig:
        """The core's hyperparameters of the explicit-feedback (MF) family."""
        factors = _MF.n_factors
        if self.dp_epsilon is not None and PRIVATE_EXPLICIT.n_factors is not None:
            factors = PRIVATE_EXPLICIT.n_factors
        return MFConfig(
            algorithm=self.algorithm,
            n_factors=self.factors or factors,
            reg=self.reg or _MF.reg,
            local_epochs=self.local_epochs,
            local_lr=self.local_lr,
            batch_size=self.batch_size,
            prox_mu=self.prox_mu,
            server_lr=self.server_lr,
            top_k=self.top_k,
            relevance_threshold=self.relevance_threshold,
            clip_to=self.rating_scale,
            aggregation=self.aggregation,
            trim=self.trim,
            clip_factor=self.clip_factor,
            attack=self.attack,
            attack_clients=choose_attackers(self.clients or 0, self.attack_fraction, self.seed),
            attack_scale=self.attack_scale,
        )

    def held_out_rows(self) -> str:
        """Which rows this run holds out, in words: a model is scored fairly only on rows its
        own run held out too (``fedrec.held_out`` on each version)."""
        if self.sites is not None:
            return "each site's own split"
        if self.train is not None:
            valid = "file" if self.valid is not None else f"{self.valid_fraction:g} of training"
            return f"split files (validation: {valid})"
        return (
            f"{self.split} split, validation {self.valid_fraction:g}, test {self.test_fraction:g}"
        )

    def config_hash(self) -> str:
        """Hash of everything that shapes the model (tracking and promotion settings excluded)."""
        shaping = self.model_dump(
            exclude={
                # the data's content is its fingerprint, beside this hash: the same rows under
                # another name (a copy, a dated export) are the same data
                "data",
                "experiment",
                "model_name",
                "tracking_uri",
                "promotion_metric",
                "min_delta",
                "max_client_regression",
                "workspace",
                "keep_workspace",
                "resume",
                "dp_budget",
                "dp_budget_delta",
                "dp_ledger_set_cap",
                "dp_ledger_secret",
                "task_retries",
                "retry_backoff",
                "round_timeout",
                "round_retries",
                "skip_if_unchanged",
                "eval_every",
                "cohort_size",  # how per-user clients are grouped into tasks (tested: same model)
                "task_runner",
                "dask_address",
            }
        )
        # split files count by their rows and which file each came from (the fingerprint), not
        # by their paths: a dated export's train/test pair under new names is the same data
        for split in ("train", "valid", "test"):
            if shaping.get(split) is not None:
                shaping[split] = "file"
        return hashlib.sha256(
            json.dumps(shaping, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]

    @classmethod
    def simulation_fields(cls) -> list[str]:
        """The fields that simulate attacks and faults, for tests and benchmarks: a deployment
        does not take them (:mod:`fedrec.lock_parameters`)."""
        return [
            name
            for name, field in cls.model_fields.items()
            if (field.description or "").startswith("simulation:")
        ]

    @classmethod
    def signature(cls) -> inspect.Signature:
        """Keyword-only parameters, one per field, annotated with the field (type, bounds, default).

        The training flow takes this signature, so Prefect shows every field in its form and a
        deployment run can override one of them (``-p rounds=5``) on top of the defaults.
        """
        return inspect.Signature(
            [
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=field.default,
                    annotation=Annotated[field.annotation, field],
                )
                for name, field in cls.model_fields.items()
            ]
        )

    def redacted(self) -> TrainingConfig:
        """This configuration as it may be logged: credentials masked in every URI field
        (``postgresql://user:***@host/db``, ``?token=***``); everything else unchanged."""
        fields = ("tracking_uri", "dask_address", "data", "train", "valid", "test")
        changes = {
            name: redact_uri(value)
            for name in fields
            if isinstance(value := getattr(self, name), str) and redact_uri(value) != value
        }
        # model_construct: the masked copy is for logging, not re-validated (paths need not exist)
        return self.model_construct(**(self.model_dump() | changes)) if changes else self

    def flat_params(self) -> dict[str, str]:
        """The configuration as MLflow params (strings, None as empty), credentials masked; the
        settings whose default depends on the family hold the value the run uses."""
        values = self.redacted().model_dump()
        values |= {"model_name": self.registered_name, "promotion_metric": self.promotion}
        if self.feedback == "explicit":
            mf = self.mf_config()
            values |= {"factors": mf.n_factors, "reg": mf.reg}
        elif self.implicit_model != "neural":
            ranking = self.ranking_config()
            values |= {"factors": ranking.n_factors, "reg": ranking.reg}
        if self.sites is not None:  # the sites hold the data: no simulated data was used
            values = {k: v for k, v in values.items() if k not in _SIMULATED_DATA}
        else:  # only the data settings the run reads: split files, or a source
            unread = ("data",) if self.train is not None else ()
            if self.train is not None or self.data != "synthetic":
                unread += _SYNTHETIC_DATA
            values = {k: v for k, v in values.items() if k not in unread}
        return {k: "" if v is None else str(v) for k, v in values.items()}


def _check_sites(config: TrainingConfig) -> None:
    """What a run over real sites cannot do yet, refused in one line each."""
    if config.sites is not None and not Path(config.sites).is_file():
        raise ValueError(f"--sites {config.sites}: no such file")
    if config.secure_aggregation and config.feedback == "implicit":
        raise ValueError(
            "--sites with --secure-aggregation trains the explicit family (ALS, FedAvg variants); "
            "the neural family's updates are not summed under masks across sites yet"
        )
    if config.feedback == "implicit" and config.implicit_model != "neural":
        raise ValueError(
            "--sites trains the explicit family or the neural one (--implicit-model neural); "
            "the two-stage family runs in simulation only so far"
        )
    if config.partition == "per-user":
        raise ValueError("--sites with --partition per-user: a site is one client, not cohorts")
    if config.task_runner == "dask":
        raise ValueError(
            "--sites with --task-runner dask: the exchanges with the sites run in the "
            "coordinator's own process, which alone holds the key that opens their answers; "
            "use the default thread runner"
        )
    if config.resume is not None or config.attack != "none" or config.fault_probability:
        raise ValueError("--sites does not take --resume, --attack or fault simulation")
    if config.catalogue is not None:
        raise ValueError("--sites takes its catalogue from the sites file (catalogue: FILE)")
    given = [
        f"--{name.replace('_', '-')}"
        for name in _SIMULATED_DATA
        if getattr(config, name) not in (None, TrainingConfig.model_fields[name].default)
    ]
    if given:  # the sites' processes hold the data: these would be logged but never used
        raise ValueError(
            f"--sites reads no data here and shards none: {', '.join(given)} set a simulated "
            "run's data and clients (each site gives its own file to fedrec site run)"
        )


# the settings of a simulated run's data and its clients, which a run of real sites has no use for
_SIMULATED_DATA = (
    "data", "train", "valid", "test", "clients", "partition", "dirichlet_alpha", "partition_key",
    "key_prefix", "synthetic_users", "synthetic_items", "synthetic_interactions",
    "synthetic_taste", "synthetic_seed", "repeats",
)  # fmt: skip
# the settings of the built-in synthetic data, which a run on a file or on MovieLens does not read
_SYNTHETIC_DATA = tuple(name for name in _SIMULATED_DATA if name.startswith("synthetic_"))
