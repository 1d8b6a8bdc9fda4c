"""Assign users to clients and split each client's rows into train / validation / test.

A user belongs to exactly one client, so every row of a user stays with that client. The
assignment's randomness comes from the generator passed in. The split's does not: a row's split
is a keyed hash of its (user id, item id), so a row is held out in every run that reads it,
whatever the seed, the partition or the rows added since. A champion is then compared with a
candidate on rows neither was trained on (see :func:`row_keys`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from models.data.errors import DataValidationError
from models.data.schema import ITEM, TIMESTAMP, USER, Interactions, encode_interactions
from models.data.validate import python_value

Strategy = Literal["iid", "dirichlet", "by-key"]
SplitMethod = Literal["random", "temporal"]


def check_client_count(n_clients: int | None, n_users: int, source: str | None = None) -> None:
    """Refuse a number of clients the users cannot fill (each client holds at least one user).

    Raises
    ------
    DataValidationError
        Naming the setting ``clients``, its value and the range the data allows.
    """
    if n_clients is None or n_clients < 1:
        raise DataValidationError(
            "is not a valid number of clients",
            setting="clients",
            value=n_clients,
            allowed="an integer >= 1",
        )
    if n_clients > n_users:
        raise DataValidationError(
            f"is more clients than the data has users ({n_users})",
            file=source,
            setting="clients",
            value=n_clients,
            allowed=f"1..{n_users}",
        )


def assign_clients(
    data: Interactions,
    *,
    n_clients: int | None,
    strategy: Strategy,
    rng: np.random.Generator,
    alpha: float = 0.3,
    key: str | None = None,
    key_prefix: int | None = None,
    private: bool = False,
) -> np.ndarray:
    """Client index of every user.

    Parameters
    ----------
    data : Interactions
    n_clients : int or None
        Number of clients. For ``by-key`` it may be ``None``: one client per distinct key value.
    strategy : {"iid", "dirichlet", "by-key"}
        ``iid``: a random permutation of users cut into equal parts. ``dirichlet``: users are
        clustered by taste (k-means on a truncated SVD of their item profile), and each taste group
        is spread over clients with proportions drawn from Dirichlet(alpha): small alpha gives
        clients dominated by few tastes. ``by-key``: a user-feature column (for example ``region``,
        ``occupation``, or ``zip`` with ``key_prefix=1``) decides; values are packed whole into
        clients, largest first.
    rng : numpy.random.Generator
    alpha : float
        Dirichlet concentration (``dirichlet`` only).
    key, key_prefix
        Column of ``data.user_features`` and how many leading characters of it to use (``by-key``).
    private : bool
        A private run: a refusal of more clients than key values does not say how many there are.

    Returns
    -------
    ndarray of int32, shape (n_users,)

    Raises
    ------
    DataValidationError
        If the request cannot be met (more clients than users, no such key column, ...).
    """
    n_users = data.n_users
    if strategy == "by-key":
        return _assign_by_key(data, n_clients, key, key_prefix, private)
    check_client_count(n_clients, n_users, data.source or None)
    if strategy == "iid":
        client = np.empty(n_users, dtype=np.int32)
        for c, members in enumerate(np.array_split(rng.permutation(n_users), n_clients)):
            client[members] = c
        return client
    if strategy == "dirichlet":
        if not alpha > 0:
            raise DataValidationError(
                "is not a valid Dirichlet concentration",
                setting="dirichlet_alpha",
                value=alpha,
                allowed="a number > 0",
            )
        return _assign_dirichlet(data, n_clients, alpha, rng)
    raise DataValidationError(
        "is not a sharding strategy",
        setting="partition",
        value=strategy,
        allowed="iid, dirichlet, by-key",
    )


def _taste_groups(data: Interactions, n_groups: int, rng: np.random.Generator) -> np.ndarray:
    # SciPy and scikit-learn load here, not with the module: the command line's early input
    # check (check_client_count) runs before any heavy library
    from scipy import sparse
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD

    frame = data.frame
    profile = sparse.csr_matrix(
        (np.ones(len(frame)), (frame[USER].to_numpy(), frame[ITEM].to_numpy())),
        shape=(data.n_users, data.n_items),
    )
    n_components = max(1, min(16, data.n_items - 1, data.n_users - 1))
    seed = int(rng.integers(2**31 - 1))
    embedding = TruncatedSVD(n_components=n_components, random_state=seed).fit_transform(profile)
    embedding /= np.linalg.norm(embedding, axis=1, keepdims=True) + 1e-12
    n_groups = min(n_groups, data.n_users)
    return KMeans(n_clusters=n_groups, n_init=3, random_state=seed).fit_predict(embedding)


def _assign_dirichlet(
    data: Interactions, n_clients: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    groups = _taste_groups(data, max(2, n_clients), rng)
    client = np.empty(data.n_users, dtype=np.int32)
    for g in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == g))
        shares = rng.dirichlet(np.full(n_clients, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * members.size).astype(int)
        for c, part in enumerate(np.split(members, cuts)):
            client[part] = c
    # A client that drew nothing gets one user from the largest client, so none is empty.
    for c in range(n_clients):
        if not np.any(client == c):
            largest = np.bincount(client, minlength=n_clients).argmax()
            client[rng.choice(np.flatnonzero(client == largest))] = c
    return client


def check_columns(
    data: Interactions,
    *,
    split: str,
    partition: str,
    partition_key: str | None,
    key_prefix: int | None = None,
    n_clients: int | None = None,
    private: bool = False,
) -> None:
    """Raise the error that splitting and sharding ``data`` this way would raise for a column
    it lacks (timestamps for a temporal split, the user feature of a by-key partition) or for
    more clients than a by-key partition's values, so that a command refuses before it starts
    anything."""
    if split == "temporal":
        _require_timestamps(data)
    if partition == "by-key":
        _by_key_codes(data, n_clients, partition_key, key_prefix, private)


def _require_timestamps(data: Interactions) -> None:
    if TIMESTAMP not in data.frame:
        raise DataValidationError(
            "a temporal split needs timestamps",
            file=data.source or None,
            column=TIMESTAMP,
            allowed="data with a timestamp column (--timestamp-col names it), or split=random",
        )


def _key_column(data: Interactions, key: str | None) -> pd.Series:
    features = data.user_features
    available = [] if features is None else list(features.columns)
    if key is None or features is None or key not in features:
        raise DataValidationError(
            "is not a user-feature column of this dataset",
            file=data.source or None,
            setting="partition_key",
            value=key,
            allowed=", ".join(map(str, available)) or "none (this dataset has no user features)",
        )
    return features[key]


def _by_key_codes(
    data: Interactions,
    n_clients: int | None,
    key: str | None,
    key_prefix: int | None,
    private: bool = False,
) -> tuple[np.ndarray, int]:
    """Each user's key value (an index into the sorted distinct values) and how many there are;
    refuses more clients than values (without their number in a ``private`` run, where it is
    not released)."""
    values = _key_column(data, key).astype("string").fillna("<missing>")
    if key_prefix is not None:
        values = values.str.slice(0, key_prefix)
    codes, uniques = pd.factorize(values, sort=True)
    if n_clients is not None and not 1 <= n_clients <= len(uniques):
        if private:
            raise DataValidationError(
                f"is more clients than column {key!r} has distinct values (how many is not said "
                "under dp_epsilon)",
                setting="clients", value=n_clients, allowed="fewer clients",
            )  # fmt: skip
        raise DataValidationError(
            f"is more clients than column {key!r} has distinct values ({len(uniques)})",
            setting="clients",
            value=n_clients,
            allowed=f"1..{len(uniques)}",
        )
    return codes, len(uniques)


def _assign_by_key(
    data: Interactions,
    n_clients: int | None,
    key: str | None,
    key_prefix: int | None,
    private: bool = False,
) -> np.ndarray:
    codes, n_values = _by_key_codes(data, n_clients, key, key_prefix, private)
    if n_clients is None:
        return codes.astype(np.int32)
    sizes = np.bincount(codes, minlength=n_values)
    load = np.zeros(n_clients, dtype=np.int64)
    value_to_client = np.empty(n_values, dtype=np.int32)
    for v in np.argsort(-sizes, kind="stable"):  # largest value first onto the lightest client
        target = int(load.argmin())
        value_to_client[v] = target
        load[target] += sizes[v]
    return value_to_client[codes]


# Key of the hash behind every row's split (pandas' SipHash key: 16 bytes). Not a secret: the
# split only has to be the same in every run, and independent of the seed that trains.
SPLIT_HASH_KEY = "fedrec-split-v1."


def row_keys(data: Interactions) -> np.ndarray:
    """A number in [0, 1) per row: a keyed hash of its (user id, item id) in the caller's ids.

    The same row gets the same key in every run, on every machine and at every site, whatever
    the other rows, the seed or the client it belongs to; keys of different rows are as good as
    independent uniform draws.
    """
    frame = data.frame
    ids = pd.DataFrame({
        "user": np.asarray(data.user_ids)[frame[USER].to_numpy()],
        "item": np.asarray(data.item_ids)[frame[ITEM].to_numpy()],
    })  # fmt: skip
    hashed = pd.util.hash_pandas_object(ids, index=False, hash_key=SPLIT_HASH_KEY).to_numpy()
    return (hashed >> np.uint64(11)).astype(np.float64) / float(2**53)


def split_rows(
    data: Interactions, *, method: SplitMethod, valid_fraction: float, test_fraction: float
) -> np.ndarray:
    """Split code per row: 0 train, 1 validation, 2 test.

    ``random`` holds out each row by its key (:func:`row_keys`): test below ``test_fraction``,
    validation below ``test_fraction + valid_fraction``, so the fractions hold in expectation
    and a row's split never depends on the seed, the partition or the other rows. ``temporal``
    holds out the latest rows of each user (by timestamp; ties broken by key). Either way each
    user with at least one row keeps at least one training row, so it can be folded in.
    """
    if not (
        0 <= valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1
    ):
        raise DataValidationError(
            "are not valid held-out fractions",
            column="valid_fraction, test_fraction",
            value=(valid_fraction, test_fraction),
            allowed="each in [0, 1) and summing to < 1",
        )
    frame = data.frame
    users = frame[USER].to_numpy()
    keys = row_keys(data)
    if method == "random":
        split = np.where(
            keys < test_fraction, 2, np.where(keys < test_fraction + valid_fraction, 1, 0)
        )
        split = split.astype(np.int8)
        rank = keys  # the row a user keeps for training, if none is left: its largest key
    elif method == "temporal":
        _require_timestamps(data)
        ranked = pd.DataFrame({"g": users, "k": frame[TIMESTAMP].to_numpy() + keys * 1e-3})
        position = ranked.groupby("g")["k"].rank(method="first").to_numpy() - 1
        size = ranked.groupby("g")["k"].transform("size").to_numpy()
        n_test = np.floor(size * test_fraction)
        n_valid = np.floor(size * valid_fraction)
        from_end = size - 1 - position
        split = np.zeros(len(frame), dtype=np.int8)
        split[from_end < n_test + n_valid] = 1
        split[from_end < n_test] = 2
        rank = from_end  # the earliest row
    else:
        raise DataValidationError(
            "is not a split method", setting="split", value=method, allowed="random, temporal"
        )
    # Never hold out a user's only training row.
    trains = np.bincount(users[split == 0], minlength=data.n_users)
    without = trains[users] == 0
    if without.any():
        rows = pd.DataFrame({"u": users[without], "r": rank[without]})
        split[np.flatnonzero(without)[rows.groupby("u")["r"].idxmax().to_numpy()]] = 0
    return split


def split_each_user(
    data: Interactions, *, valid_fraction: float, test_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Split code per row (0 train, 1 validation, 2 test): each user's rows shuffled and cut by
    ratio with RecBole's rounding (``_calcu_split_ids``: held-out counts are ``int(fraction * n)``,
    and a share that rounds to 0 still gets one row while the user keeps two training rows)."""
    users = data.frame[USER].to_numpy()
    order = np.lexsort((rng.random(users.size), users))  # by user, random within a user
    split = np.empty(users.size, dtype=np.int8)
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    fractions = (valid_fraction, test_fraction)
    for rows in np.split(order, bounds):
        total = rows.size
        held = [int(f * total) for f in fractions]
        n_train = total - sum(held)
        for i in (1, 0):  # RecBole walks the held-out parts from the last
            if n_train <= 1:
                break
            if 0 < fractions[i] * total < 1:
                held[i] += 1
                n_train -= 1
        split[rows[:n_train]] = 0
        split[rows[n_train : n_train + held[0]]] = 1
        split[rows[n_train + held[0] :]] = 2
    return split


def combine_splits(
    train: Interactions, test: Interactions, valid: Interactions | None = None
) -> tuple[Interactions, np.ndarray]:
    """Join explicit train / test (/ validation) files into one id space, with each row's split.

    Users then go to clients as usual and take their rows of every split along, so standard splits
    (ML-100K's ``u1.base``/``u1.test``, say) can be compared with other systems.
    """
    parts = [(train, 0), (test, 2)] + ([(valid, 1)] if valid is not None else [])
    frames, labels = [], []
    for data, label in parts:
        frame = data.frame.copy()
        frame[USER] = data.user_ids[frame[USER].to_numpy()]
        frame[ITEM] = data.item_ids[frame[ITEM].to_numpy()]
        frames.append(frame)
        labels.append(np.full(len(frame), label, dtype=np.int8))
    names = {0: "training", 1: "validation", 2: "test"}
    by_split = sorted(zip(parts, frames, strict=True), key=lambda pair: pair[0][1])
    for later in range(1, len(by_split)):
        (data, _), frame = by_split[later]
        for (earlier, label), earlier_frame in by_split[:later]:
            _refuse_shared_pairs(
                frame, data.source, earlier_frame,
                f"the {names[label]} file {earlier.source or ''}".rstrip(),
            )  # fmt: skip
    joined = pd.concat(frames, ignore_index=True)
    if any(TIMESTAMP not in f for f in frames):
        joined = joined.drop(columns=[TIMESTAMP], errors="ignore")
    scales = [d.rating_scale for d, _ in parts if d.rating_scale is not None]
    scale = (min(s[0] for s in scales), max(s[1] for s in scales)) if scales else None

    def by_id(features: pd.DataFrame | None, ids: np.ndarray) -> pd.DataFrame | None:
        return None if features is None else features.set_axis(ids)

    notes = [*train.notes]
    for (data, _), frame in zip(parts[1:], frames[1:], strict=True):  # rows the training
        notes += data.notes  # rows say nothing about
        cold = ~(frame[USER].isin(train.user_ids) & frame[ITEM].isin(train.item_ids))
        if cold.any():
            notes.append(
                f"{data.source or 'held-out file'}: {int(cold.sum())} of {len(frame)} rows have a "
                "user or an item the training file lacks"
                + (": the metrics on it say nothing of the model" if cold.all() else "")
            )
    combined = encode_interactions(
        joined,
        rating_scale=scale,
        source=" + ".join(d.source for d, _ in parts),
        user_features=_user_features_of(parts),
        item_features=by_id(train.item_features, train.item_ids),
        notes=notes,
    )
    return combined, np.concatenate(labels)


def _refuse_shared_pairs(
    held_out: pd.DataFrame, source: str, other: pd.DataFrame, other_name: str
) -> None:
    """Refuse a held-out file with (user, item) pairs that an earlier split file also has: the
    model would be scored on rows it learned (a test row in the training file scores its
    rating as learned, and excludes its item from the ranking)."""
    # by the ids' text: one file's integer 7 and another's "7" name the same user or item
    pairs, earlier = (f[[USER, ITEM]].astype(str).reset_index(drop=True) for f in (held_out, other))
    shared = pairs.reset_index().merge(earlier.drop_duplicates(), how="inner")
    if shared.empty:
        return
    # column by column: a row of mixed types (ints beside a float rating) would be all floats
    at = int(shared["index"].min())
    user, item = (held_out[column].iloc[at] for column in (USER, ITEM))
    user, item = (v.item() if isinstance(v, np.generic) else v for v in (user, item))
    raise DataValidationError(
        f"{len(shared)} of {len(held_out)} rows have a (user, item) pair {other_name} also has "
        f"(the first: user {user!r}, item {item!r})",
        file=source or None,
        allowed="held-out rows of pairs the other split files lack: the model would be scored "
        "on rows it learned",
    )


def _user_features_of(parts: list[tuple[Interactions, int]]) -> pd.DataFrame | None:
    """The split files' user features by user id: the training file's, then what a held-out
    file adds (its users, and values the earlier files left empty); a user whose value differs
    between files is refused (an empty cell differs from nothing)."""
    known: pd.DataFrame | None = None
    for data, _ in parts:
        if data.user_features is None:
            continue
        features = data.user_features.set_axis(data.user_ids)
        if known is None:
            known = features
            continue
        both = features.index.intersection(known.index)
        for column in features.columns.intersection(known.columns):
            mine, theirs = features.loc[both, column], known.loc[both, column]
            differs = mine.ne(theirs) & mine.notna() & theirs.notna()
            if differs.any():
                user = differs.index[np.argmax(differs.to_numpy())]
                raise DataValidationError(
                    f"of user {python_value(user)!r} differs from "
                    f"{python_value(known.at[user, column])!r} in an earlier split file",
                    file=data.source or None, column=str(column),
                    value=python_value(features.at[user, column]),
                    allowed="one value per user across the training and held-out files",
                )  # fmt: skip
        known = known.combine_first(features)
    return known


def hold_out_validation(data: Interactions, split: np.ndarray, *, fraction: float) -> np.ndarray:
    """Turn a ``fraction`` of the training rows into validation rows, by their keys (as
    :func:`split_rows` does).

    For explicit train/test files without a validation file: promotion and the per-round
    validation metrics need validation rows. Each user keeps at least one training row.
    """
    train = np.flatnonzero(split == 0)
    if fraction <= 0 or train.size == 0:
        return split
    subset = Interactions(
        data.frame.iloc[train], data.user_ids, data.item_ids, data.rating_scale, source=data.source
    )
    inner = split_rows(subset, method="random", valid_fraction=fraction, test_fraction=0.0)
    out = split.copy()
    out[train] = inner
    return out
