"""Tasks that bring data in: load + validate, then shard into per-client partitions."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from fedrec.config import TrainingConfig
from fedrec.inputs import file_options, reads_user_features, synthetic_options
from models.client import ClientData
from models.data.partitions import Manifest, build_clients, write_partitions
from models.data.readers import TABLE_SUFFIXES, has_suffix, load_dataset, read_item_list
from models.data.schema import (
    ITEM,
    USER,
    Interactions,
    every_row_positive,
    keep_positives,
    require_ratings,
    with_catalogue,
)
from models.data.sharding import (
    assign_clients,
    check_client_count,
    check_columns,
    combine_splits,
    hold_out_validation,
    split_rows,
)
from models.data.validate import USER_SIDE_FEATURES


def _load(spec: str, config: TrainingConfig) -> Interactions:
    if spec == "synthetic":
        return load_dataset(spec, **synthetic_options(config.model_dump()))
    path = Path(spec)
    is_table = has_suffix(path, TABLE_SUFFIXES)
    return load_dataset(spec, **(file_options(config.model_dump()) if is_table else {}))


@task(name="load-and-validate", cache_policy=NONE)
def load_interactions(config: TrainingConfig) -> tuple[Interactions, np.ndarray | None]:
    """Read and validate the configured data; with explicit split files also each row's split.
    For implicit feedback with a ``positive_threshold``, only the positive rows remain."""
    threshold = config.positive_threshold

    def read(spec: str) -> Interactions:
        data = _load(spec, config)
        if config.feedback == "explicit":
            require_ratings(data, config.rating_col)
        elif threshold is None:
            return every_row_positive(data)
        return keep_positives(data, threshold)

    if config.train is None:
        data, _ = public_catalogue(read(config.data), config)
        return data, None
    assert config.test is not None  # the config validator guarantees the pair
    valid = read(config.valid) if config.valid else None
    data, split = combine_splits(read(config.train), read(config.test), valid)
    data, kept = public_catalogue(data, config)
    return data, split[kept]


def data_fingerprint(
    data: Interactions, config: TrainingConfig, split: np.ndarray | None = None
) -> str:
    """What a run's data is, for "unchanged since the champion": the rows' fingerprint; with
    split files (``split``, each row's split code) also which split each row came from, so the
    same files under other names are unchanged and a row moved between them is not; under a
    by-key partition each user's key too, since moving a user to another client changes the
    partition (and with it any model not solved exactly); and the users' side features where
    the model's re-ranker reads them."""
    rows = data.fingerprint()
    sides = []
    if data.user_features is not None and reads_user_features(config.model_dump()):
        sides = [c for c in USER_SIDE_FEATURES if c in data.user_features]
    by_key = (
        config.partition == "by-key"
        and data.user_features is not None
        and config.partition_key in data.user_features  # else sharding refuses it, in its words
    )
    if split is None and not by_key and not sides:
        return rows
    digest = hashlib.sha256(rows.encode())
    if split is not None:
        frame = data.frame
        held = pd.DataFrame({
            "user": np.asarray([str(u) for u in data.user_ids], dtype=object)[frame[USER].to_numpy()],
            "item": np.asarray([str(i) for i in data.item_ids], dtype=object)[frame[ITEM].to_numpy()],
            "split": np.asarray(split, dtype=np.int8),
        }).sort_values(["user", "item"])  # fmt: skip
        digest.update(b"split files\n")
        digest.update(pd.util.hash_pandas_object(held, index=False).to_numpy())
    if by_key:
        assert data.user_features is not None
        keys = pd.DataFrame({"user": [str(u) for u in data.user_ids],
                             "key": data.user_features[config.partition_key].astype(str).to_numpy()})  # fmt: skip
        digest.update(pd.util.hash_pandas_object(keys.sort_values("user"), index=False).to_numpy())
    if sides:
        assert data.user_features is not None
        features = (
            data.user_features[sides].astype(str).assign(user=[str(u) for u in data.user_ids])
        )
        digest.update(b"user features\n")
        digest.update(
            pd.util.hash_pandas_object(features.sort_values("user"), index=False).to_numpy()
        )
    return digest.hexdigest()


def public_catalogue(
    data: Interactions, config: TrainingConfig
) -> tuple[Interactions, np.ndarray | slice]:
    """``data`` numbered against the published item list (``--catalogue``), or in a private run
    against the dataset's own public list when it has one (MovieLens, synthetic): the model then
    lists those items, not the ones the rows touch. Unchanged otherwise. Also which rows were
    kept (a boolean mask, or a slice of all)."""
    if config.catalogue is not None:
        items = read_item_list(config.catalogue, config.item_col).drop_duplicates()
        return with_catalogue(data, pd.DataFrame(index=items), config.catalogue)
    if config.dp_epsilon is not None and data.public_items is not None:
        return with_catalogue(data, data.public_items, "the dataset's public item list")
    return data, slice(None)


def check_sharding(data: Interactions, config: TrainingConfig) -> None:
    """Refuse, before anything is written (a privacy reservation, an MLflow run), a split or
    partition that ``data`` cannot meet: the error :func:`plan_clients` would raise later for a
    missing column, a partition key it lacks, or more clients than users (or key values).

    Raises
    ------
    DataValidationError
    """
    check_columns(data, split=config.split, partition=config.partition,
                  partition_key=config.partition_key, key_prefix=config.key_prefix,
                  n_clients=config.clients, private=config.dp_epsilon is not None)  # fmt: skip
    if config.partition in ("iid", "dirichlet"):
        check_client_count(config.clients, data.n_users, data.source or None)


def plan_clients(
    data: Interactions, split: np.ndarray | None, config: TrainingConfig
) -> list[ClientData]:
    """Each client's rows with their split, as the configuration asks (seeded, deterministic).

    With ``partition="per-user"`` every user is a client, and the partitions are cohorts of
    ``cohort_size`` users (a seeded shuffle cut in order). A row's split depends on the row alone
    (:func:`~models.data.sharding.split_rows`), not on the seed or on how users are grouped."""
    rng = np.random.default_rng([config.seed, 1])
    if config.partition == "per-user":
        cohorts = -(-data.n_users // config.cohort_size)
        client_of_user = assign_clients(data, n_clients=cohorts, strategy="iid", rng=rng)
    else:
        client_of_user = assign_clients(
            data,
            n_clients=config.clients,
            strategy=config.partition,
            rng=rng,
            alpha=config.dirichlet_alpha,
            key=config.partition_key,
            key_prefix=config.key_prefix,
            private=config.dp_epsilon is not None,
        )
    if split is not None and not np.any(split == 1):  # explicit files without a validation file
        split = hold_out_validation(data, split, fraction=config.valid_fraction)
    if split is None:
        split = split_rows(
            data,
            method=config.split,
            valid_fraction=config.valid_fraction,
            test_fraction=config.test_fraction,
        )
    return build_clients(data, client_of_user, split)


@task(name="shard-clients", cache_policy=NONE)
def shard_clients(
    data: Interactions,
    split: np.ndarray | None,
    config: TrainingConfig,
    workspace: str,
    *,
    fingerprint: str | None = None,
) -> Manifest:
    """Assign users to clients, split each client's rows, write one partition per client; the
    manifest records ``fingerprint`` (default: the rows' own, :meth:`Interactions.fingerprint`)."""
    return write_partitions(data, plan_clients(data, split, config), workspace, fingerprint)
