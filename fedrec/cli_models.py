"""`fedrec recommend` and `fedrec predict`: use a registered model on users' histories;
`fedrec models` and `fedrec runs`: what the registry and the training runs say."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fedrec.cli_errors import UserError, debug_option, friendly_errors, store_error

if TYPE_CHECKING:  # loaded by the commands that read tables, not by their --help
    import pandas as pd

SCORE_FORMAT = "%.6g"


def _requests(
    history: str, users: pd.DataFrame | None, columns: dict[str, str], model: Any
) -> pd.DataFrame:
    """One request row per user from a history file (user_id,item_id[,rating], or the columns
    named by ``columns``: ``user_col``, ``item_col``, ``rating_col``), or, given ``users``
    (:func:`_read_users`), one per user there. For a ``model`` that predicts ratings from a
    user's ratings, the history must hold ratings on its scale."""
    import pandas as pd

    from models.data.errors import NoDataRows
    from models.data.readers import read_interactions

    scale = getattr(model, "rating_scale", None)  # a rating model's; None: any rating, or none
    try:
        data = read_interactions(history, rating_scale=scale, **columns)
    except NoDataRows as err:
        if users is None:
            raise UserError(
                f"{history}: has no data rows; allowed: at least one row, or --users FILE to "
                "ask for users with no history yet"
            ) from err
        # the users of --users have no history yet: each gets the cold-start answer
        empty = pd.DataFrame({"user_id": pd.Series(dtype=str)})
        return _with_users(empty.assign(history_items=[], history_ratings=[]), users)
    if scale is not None and data.rating_scale is None:
        raise UserError(
            f"{history}: no rating column {columns['rating_col']!r}: this model predicts ratings "
            f"from the user's own; allowed: ratings in [{scale[0]:g}, {scale[1]:g}] "
            "(--rating-col names their column), or, for a history without ratings, a model "
            "trained with --feedback implicit (--model models:/fedrec-ranking@champion)"
        )
    for note in data.notes:  # the rows a user gave twice: the latest of each is the one used
        if "duplicate" in note:
            click.echo(f"fedrec: note: {history}: {note}", err=True)
    frame = data.frame
    rows = pd.DataFrame(
        {
            "user_id": data.user_ids[frame["user"].to_numpy()].astype(str),
            "item": data.item_ids[frame["item"].to_numpy()].astype(str),
            "rating": frame["rating"].to_numpy(),
        }
    )
    grouped = rows.groupby("user_id", sort=False).agg(
        history_items=("item", list), history_ratings=("rating", list)
    )
    requests = grouped.reset_index()
    if data.rating_scale is None:  # no rating column: nothing for a model to weigh or filter by
        requests["history_ratings"] = [[] for _ in range(len(requests))]
    return _with_users(requests, users) if users is not None else requests


def _read_users(users: str, columns: dict[str, str]) -> pd.DataFrame:
    """The users of a --users file, once each, in its order, with the side features a ranking
    model's re-ranker uses (checked: :func:`_check_user_features`)."""
    import pandas as pd

    from models.data.validate import USER_SIDE_FEATURES

    wanted = _read_ids(users, {columns["user_col"]: "user_id"})
    _check_user_features(wanted, users)
    # side features a ranking model's re-ranker uses (ignored by MF models)
    kept = ["user_id", *(c for c in USER_SIDE_FEATURES if c in wanted)]
    wanted = wanted[kept].drop_duplicates("user_id")
    if "age" in wanted:
        wanted["age"] = pd.to_numeric(wanted["age"], errors="coerce")
    return wanted


def _with_users(requests: pd.DataFrame, wanted: pd.DataFrame) -> pd.DataFrame:
    """One request per user of ``wanted`` (:func:`_read_users`), in its order, with the history
    ``requests`` holds for it (none: an empty one) and its side features."""
    requests = wanted.merge(requests, on="user_id", how="left")
    requests["history_items"] = requests["history_items"].apply(
        lambda v: v if isinstance(v, list) else []
    )
    requests["history_ratings"] = requests["history_ratings"].apply(
        lambda v: v if isinstance(v, list) else []
    )
    return requests


def _check_user_features(frame: pd.DataFrame, path: str) -> None:
    """Refuse a --users file whose ``age`` or ``gender`` holds a value that is there but is not
    one (an empty cell, or pandas' words for a missing value, stays unknown).

    Raises
    ------
    DataValidationError
        Naming the file, the first such row (1-based data row) and its line, the column, the
        value and what is allowed.
    """
    from models.data.errors import DataValidationError
    from models.data.readers import line_of_row
    from models.ranking.features import USER_FEATURE_VALUES, is_blank, user_feature_known

    for column, allowed in USER_FEATURE_VALUES.items():
        if column not in frame:
            continue
        for row, value in enumerate(frame[column], start=1):
            if is_blank(value) or user_feature_known(column, value):
                continue
            raise DataValidationError(
                "is not a valid " + column,
                file=path,
                row=row,
                column=column,
                value=value if isinstance(value, str) else f"{value:g}",
                allowed=allowed,
                line=line_of_row(Path(path), row),
            )


def _read_ids(path: str, names: dict[str, str]) -> pd.DataFrame:
    """A CSV of ids (text), with the columns named by ``names``'s keys renamed to its values.

    Read as the history and the training files are (:mod:`models.data.readers`): the delimiter
    sniffed (comma, semicolon, tab), spaces around the header's names dropped, ``.gz`` read
    decompressed, an empty field the only missing id; other columns keep pandas' words for a
    missing value."""
    import numpy as np

    from models.data.errors import DataValidationError
    from models.data.readers import line_of_row, read_delimited
    from models.data.validate import require_column

    wanted = f"a CSV file with column(s) {', '.join(names)}"
    if not Path(path).is_file():
        raise DataValidationError("no such file", file=path, allowed=wanted)
    if Path(path).stat().st_size == 0:
        raise DataValidationError("is empty (0 bytes)", file=path, allowed=wanted)
    frame = read_delimited(Path(path), tuple(names))
    for name in names:
        require_column(frame, name, file=path)
    if frame.empty:  # a header alone: nothing to answer, said as an empty history is
        raise DataValidationError(
            "has no data rows", file=path, allowed=f"at least one row of {', '.join(names)}"
        )
    for column in names:  # as the history's ids are read; an empty one names its row
        ids = frame[column].str.strip()
        empty = ids.isna() | (ids == "")
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0]) + 1
            raise DataValidationError(
                "missing id",
                file=path,
                row=row,
                column=column,
                allowed=f"an id in every row of {', '.join(names)}",
                line=line_of_row(Path(path), row),
            )
        frame[column] = ids
    return frame.rename(columns=names)


def _history_columns(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--user-col, --item-col, --rating-col: the history's columns, as ``fedrec train`` names them
    (the user and item columns of predict's --pairs too)."""
    for flag, default, what in reversed((
        ("--user-col", "user_id", "user column of the input files"),
        ("--item-col", "item_id", "item column of the input files"),
        ("--rating-col", "rating", "rating column of --history (a rating model needs it; "
         "without it every row is a positive)"),
    )):  # fmt: skip
        fn = click.option(flag, default=default, show_default=True, help=what)(fn)
    return fn


def _load_model(model_uri: str, tracking_uri: str | None) -> Any:
    """The registered recommender; a missing local store is a user error, not a new empty store.

    Read through :mod:`fedrec.model_store`, which imports neither Prefect nor the training code
    (and MLflow only for a store it cannot read directly).
    """
    from fedrec.model_store import ModelNotFoundError, load_recommender

    uri = _store_uri(tracking_uri)
    try:
        return load_recommender(uri, model_uri)
    except ModelNotFoundError as err:
        raise UserError(str(err)) from err


def _store_uri(tracking_uri: str | None) -> str:
    """The tracking URI to read, checked: a missing local store is a user error (not a new, empty
    store), and a server that does not answer is one line within seconds."""
    from fedrec.model_store import (
        TrackingStoreError,
        check_tracking_uri,
        resolve_tracking_uri,
        tracking_uri_source,
    )

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    uri = resolve_tracking_uri(tracking_uri, create=False)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(
            f"no MLflow store at {uri.removeprefix('sqlite:///')}: train first (fedrec train) or pass --tracking-uri"
        )
    try:
        check_tracking_uri(uri, name=tracking_uri_source(tracking_uri))
    except TrackingStoreError as err:
        raise store_error(err) from err
    return uri


def _check_out(out: str | None, inputs: dict[str, str | None]) -> None:
    """Refuse, before any work, an --out that cannot be written: a folder, a file in a folder
    that does not exist or cannot be written to, or one of the command's own ``inputs`` (flag:
    path), which writing would overwrite."""
    if not out:
        return
    path = Path(out).expanduser()
    if path.is_dir():
        raise UserError(
            f"--out {out}: is a folder; allowed: a file path (a new file, or one to replace)"
        )
    folder = path.resolve().parent
    if not folder.is_dir():
        raise UserError(
            f"--out {out}: no such folder {folder}; allowed: a file in an existing folder"
        )
    for flag, given in inputs.items():
        if given and _same_file(path, Path(given).expanduser()):
            raise UserError(
                f"--out {out}: is the same file as {flag} {given}, which writing would overwrite; "
                f"allowed: another file"
            )
    problem = _cannot_write(path, folder)
    if problem:
        raise UserError(
            f"--out {out}: cannot be written ({problem}); allowed: a file in a folder you can "
            "write to"
        )


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (the same inode when both exist: links included)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _cannot_write(path: Path, folder: Path) -> str | None:
    """Why ``path`` (in ``folder``) cannot be written, or None: an existing file is opened for
    appending (nothing written), a new one is tried as a temporary file in its folder (removed),
    so a read-only or virtual file system is caught as well as the permissions ``os.access``
    sees."""
    import tempfile

    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable"
    try:
        if path.exists():
            with path.open("ab"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".fedrec-out-"):
                pass
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


def _write(frame: pd.DataFrame, out: str | None) -> None:
    """The CSV, scores to six significant digits (enough to order any list; float64's 17 are
    noise to a reader)."""
    if out:
        frame.to_csv(out, index=False, float_format=SCORE_FORMAT)
        users = frame["user_id"].nunique()
        click.echo(
            f"fedrec: wrote {len(frame)} row(s) for {users} user(s) to {Path(out).resolve()}",
            err=True,
        )
    else:
        frame.to_csv(sys.stdout, index=False, float_format=SCORE_FORMAT)


_tracking_uri_option = click.option(
    "--tracking-uri",
    default=None,
    help="MLflow URI (default: $MLFLOW_TRACKING_URI, else FEDREC_HOME's SQLite)",
)


def _model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = _tracking_uri_option(fn)
    fn = click.option(
        "--model",
        "model_uri",
        default="models:/fedrec-mf@champion",
        show_default=True,
        help="model URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model",
    )(fn)
    return fn


@click.command()
@_model_options
@click.option(
    "--history",
    required=True,
    help="CSV/Parquet of user_id,item_id[,rating]: what each user has rated",
)
@click.option(
    "--users",
    default=None,
    help="CSV with a user_id column (or --user-col): recommend for these (default: every user "
    "in --history); "
    "optional age, gender, occupation columns feed a ranking model's re-ranker",
)
@_history_columns
@click.option(
    "-k",
    "--k",
    "--top-k",
    "k",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="items per user",
)
@click.option("--out", default=None, help="output CSV (default: stdout)")
@debug_option
@friendly_errors
def recommend(
    model_uri: str,
    tracking_uri: str | None,
    history: str,
    users: str | None,
    k: int,
    out: str | None,
    **columns: str,
) -> None:
    """Top-K unseen items per user: CSV user_id,rank,item_id,score,reason.

    The score is the predicted rating (clipped to the rating scale) for a model trained on
    ratings, the model's score for an implicit-feedback model, and empty for the most popular
    items a user with no known history gets. The reason says why an item is there ("predicted
    rating 4.3 from your ratings of 12 items; closest to 50 you rated 5", "similar to <title>,
    which you liked", "popular with everyone", ...) or which fallback was used.
    Use --model models:/fedrec-ranking@champion for a model trained with --feedback implicit,
    models:/fedrec-neural@champion for one of --implicit-model neural.
    """
    _check_out(out, {"--history": history, "--users": users})
    wanted = _read_users(users, columns) if users else None  # a bad file: before the model
    recommender = _load_model(model_uri, tracking_uri)
    requests = _requests(history, wanted, columns, recommender)
    result = recommender.recommend(requests, k=k)
    _note_unknown_histories(requests, recommender)
    if wanted is not None:
        _note_users_without_history(requests, history)
    _write(result[["user_id", "rank", "item_id", "score", "reason"]], out)


def _note_users_without_history(requests: pd.DataFrame, history: str) -> None:
    """One stderr line naming the --users users the history file has no row of: they get the
    most popular items, as a new user does, and a mistyped id would look like one."""
    new = [u for u, items in zip(requests["user_id"], requests["history_items"], strict=True)
           if not len(items)]  # fmt: skip
    if new:
        shown = ", ".join(map(str, new[:3])) + (", ..." if len(new) > 3 else "")
        click.echo(
            f"fedrec: note: {len(new)} of {len(requests)} user(s) of --users ({shown}) have no "
            f"row in {history}: they get the most popular items, as a new user does",
            err=True,
        )


def _known_items(recommender: Any) -> set[str]:
    """The ids of the items the model serves, as text, as histories and pairs are read."""
    import numpy as np

    return set(np.asarray(recommender.known_items).astype(str))


def _note_unknown_histories(requests: pd.DataFrame, recommender: Any) -> None:
    """One stderr line when some users' histories hold items but none the model knows: their
    lists are the most popular items (often a sign of the wrong model or the wrong item column;
    a user without history gets them too, as expected, and no line)."""
    known = _known_items(recommender)
    blind = [u for u, items in zip(requests["user_id"], requests["history_items"], strict=True)
             if len(items) and not any(str(i) in known for i in items)]  # fmt: skip
    if blind:
        shown = ", ".join(map(str, blind[:3])) + (", ..." if len(blind) > 3 else "")
        click.echo(
            f"fedrec: note: {len(blind)} of {len(requests)} user(s) ({shown}) have no history "
            "item this model knows: they get the most popular items (is it the right model, "
            "and --item-col the right column?)",
            err=True,
        )


@click.command()
@_model_options
@click.option(
    "--history", required=True, help="CSV/Parquet of user_id,item_id[,rating] to fold users in from"
)
@click.option("--pairs", required=True, help="CSV of user_id,item_id pairs to score")
@_history_columns
@click.option("--out", default=None, help="output CSV (default: stdout)")
@debug_option
@friendly_errors
def predict(
    model_uri: str, tracking_uri: str | None, history: str, pairs: str, out: str | None,
    **columns: str,
) -> None:  # fmt: skip
    """Predicted scores for given (user, item) pairs: CSV user_id,item_id,score, one row per
    pair in the order given (score empty where the model cannot score it: an unknown item, or
    for a ranking model an item already in the history; stderr says why)."""
    _check_out(out, {"--history": history, "--pairs": pairs})
    wanted = _read_ids(pairs, {columns["user_col"]: "user_id", columns["item_col"]: "item_id"})
    recommender = _load_model(model_uri, tracking_uri)
    requests = _requests(history, None, columns, recommender)
    candidates = (
        wanted.groupby("user_id", sort=False)["item_id"].agg(list).rename("items").reset_index()
    )
    requests = candidates.merge(requests, on="user_id", how="left")
    for column in ("history_items", "history_ratings"):
        requests[column] = requests[column].apply(lambda v: v if isinstance(v, list) else [])
    result = recommender.recommend(requests)
    # one row per asked pair, in the order asked: a pair the model could not score has no score
    scores = result.drop_duplicates(["user_id", "item_id"])[
        ["user_id", "item_id", "score", "reason"]
    ]
    answered = wanted[["user_id", "item_id"]].merge(scores, on=["user_id", "item_id"], how="left")
    _report_unscored(answered, requests, recommender)
    _write(answered[["user_id", "item_id", "score"]], out)


def _report_unscored(answered: pd.DataFrame, requests: pd.DataFrame, recommender: Any) -> None:
    """One stderr line per pair without a score, naming the user, the item and why; and one per
    user whose history had unknown items or none the model knows (its scores are a fallback's)."""
    import pandas as pd

    from models.recommenders import NO_HISTORY

    known = _known_items(recommender)
    history = dict(zip(requests["user_id"], requests["history_items"], strict=True))
    told = set()  # users whose pair lines already said they have no known history
    for user, item, score, reason in answered.itertuples(index=False):
        if pd.isna(score):
            if item not in known:
                why = "not an item this model knows"
            elif item in history.get(user, []):
                why = "already in the user's history (this model scores only new items)"
            else:
                why = reason if isinstance(reason, str) and reason else "the model gave none"
            if why.startswith(NO_HISTORY):
                told.add(user)
            click.echo(f"fedrec: note: user {user}, item {item}: no score: {why}", err=True)
    scored = answered.dropna(subset=["reason"]).drop_duplicates("user_id")
    for user, reason in scored[["user_id", "reason"]].itertuples(index=False):
        about_user = [p for p in reason.split("; ") if p.startswith("ignored ")
                      or (p.startswith(NO_HISTORY) and user not in told)]  # fmt: skip
        if about_user:
            click.echo(f"fedrec: note: user {user}: {'; '.join(about_user)}", err=True)


def version_rows(client: Any, name: str, limit: int) -> tuple[str | None, list[dict[str, Any]]]:
    """The champion's version (None: no alias) and the newest ``limit`` versions of registered
    model ``name``, newest first, then the champion's if it is older, as the registry records
    them: champion or not, when registered, the metric its promotion was decided on and its
    value, the decision and its reason, the data it was trained on."""
    import datetime

    champion = client.get_registered_model(name).aliases.get("champion")
    champion = None if champion is None else str(champion)
    versions = client.search_model_versions(
        f"name='{name}'", order_by=["version_number DESC"], max_results=limit
    )
    if champion is not None and champion not in {str(v.version) for v in versions}:
        versions = [*versions, client.get_model_version(name, champion)]
    rows = []
    for v in versions:
        tags = v.tags
        # versions registered before the tag existed: their one decisive metric tag
        decisive = [k.removeprefix("metric.") for k in tags if k.startswith("metric.valid/")]
        decisive = [k for k in decisive if "/client_" not in k]
        metric = tags.get("fedrec.promotion_metric") or (decisive[0] if decisive else "")
        registered = datetime.datetime.fromtimestamp(v.creation_timestamp / 1000, datetime.UTC)
        rows.append({
            "version": str(v.version),
            "champion": str(v.version) == champion,
            "registered": registered.strftime("%Y-%m-%d %H:%M"),
            "metric": metric,
            "value": _number(tags.get(f"metric.{metric}")),
            "promoted": _decided(tags.get("fedrec.promoted")),
            "reason": tags.get("fedrec.promotion_reason", ""),
            "source": tags.get("fedrec.source", ""),
            "epsilon": _number(tags.get("fedrec.epsilon")),  # None: not private
            "dp_not_covered": tags.get("fedrec.dp_not_covered"),
            "replaced_by": tags.get("fedrec.replaced_by_version"),  # a later champion's version
            "rolled_back": tags.get("fedrec.rolled_back"),  # by an operator: when, to what, why
            "restored": tags.get("fedrec.restored"),
            "run_id": v.run_id,
        })  # fmt: skip
    return champion, rows


@click.command()
@_tracking_uri_option
@click.option("--model-name", default=None, help="one registered model [default: every one]")
@click.option(
    "--limit",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="newest versions shown per model",
)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per model on stdout")
@debug_option
@friendly_errors
def models(tracking_uri: str | None, model_name: str | None, limit: int, as_json: bool) -> None:
    """The registered models and their newest versions: which one is the champion (*, listed
    last when older than those), when each was registered, the metric its promotion was decided
    on, whether it was promoted (since replaced by a later champion, or demoted by
    `fedrec rollback`) and why.

    \b
    fedrec models
    fedrec models --model-name fedrec-ranking --limit 3
    """
    import json

    from fedrec.cli import _status

    with _status("loading MLflow and reading the registry"):  # shown on a terminal only
        from mlflow import MlflowClient

        uri = _store_uri(tracking_uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        names = sorted(m.name for m in client.search_registered_models())
    if model_name is not None:
        _check_registered(model_name, names)
        names = [model_name]
    if not names:
        click.echo(f"no registered models in {uri}; train one first (fedrec train)")
        return
    for name in names:
        champion, rows = version_rows(client, name, limit)
        if as_json:
            click.echo(json.dumps({"model": name, "champion": champion, "versions": rows}))
            continue
        alias = (
            f"champion version {champion} (models:/{name}@champion)" if champion else "no champion"
        )
        click.echo(f"{name}: {alias}")
        click.echo("  version  registered (UTC)  metric              value     promoted  reason")
        for r in rows:
            mark = "*" if r["champion"] else " "
            value = "" if r["value"] is None else f"{r['value']:.6g}"
            private = "" if r["epsilon"] is None else f"private, epsilon {r['epsilon']:g}: "
            click.echo(
                f"  {r['version'] + mark:<8} {r['registered']:<17} {r['metric']:<19} "
                f"{value:<9} {_promoted(r):<9} {private}{r['reason']}"
            )
            if r["dp_not_covered"]:
                click.echo(f"  {'':<8} not covered by DP: {r['dp_not_covered']}")
            for key in ("rolled_back", "restored"):  # what an operator did since
                if r[key]:
                    click.echo(f"  {'':<8} {key.replace('_', ' ')}: {r[key]}")


_PROMOTED = {True: "true", False: "false"}


def _check_registered(model_name: str, names: list[str]) -> None:
    """Refuse a ``--model-name`` that is not among the store's registered ``names``."""
    if model_name not in names:
        raise UserError(
            f"--model-name {model_name}: no such registered model; registered: "
            f"{', '.join(names) or 'none'}"
        )


def _promoted(row: dict[str, Any]) -> str:
    """The ``promoted`` column: the decision when the version was registered, unless the
    champion it became has since been replaced or rolled back."""
    if row["rolled_back"]:
        return "demoted"
    if row["promoted"] and row["replaced_by"] and not row["champion"]:
        return "replaced"
    return _PROMOTED.get(row["promoted"], "-")


@click.command()
@_tracking_uri_option
@click.option(
    "--model-name",
    default=None,
    help="the registered model [default: the only one in the store]",
)
@click.option(
    "--to",
    "to",
    default=None,
    help="the version to make champion [default: the one the champion replaced]",
)
@click.option("--reason", default="", help="why, recorded on both versions' tags")
@debug_option
@friendly_errors
def rollback(tracking_uri: str | None, model_name: str | None, to: str | None, reason: str) -> None:
    """Make an earlier version the champion again: move the champion alias back (to the version
    the champion replaced, or --to VERSION), and tag both versions with when and why. A later run
    on the demoted version's data and config trains nothing, so the nightly run does not promote
    the same model again; a run on new data is compared with the restored champion as usual.

    \b
    fedrec rollback --reason "recommends out-of-stock items"
    fedrec rollback --model-name fedrec-ranking --to 3
    """
    from fedrec.cli import _status

    with _status("loading MLflow and reading the registry"):  # shown on a terminal only
        from mlflow import MlflowClient

        from tasks.tracking import RollbackError, roll_back

        uri = _store_uri(tracking_uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        names = sorted(m.name for m in client.search_registered_models())
    if model_name is None:
        if len(names) != 1:
            raise UserError(
                f"--model-name is needed: the store has {len(names)} registered models"
                + (f" ({', '.join(names)})" if names else "; train one first (fedrec train)")
            )
        model_name = names[0]
    _check_registered(model_name, names)
    try:
        demoted, restored, was = roll_back(uri, model_name, to, reason)
    except RollbackError as err:
        raise UserError(str(err)) from err
    tags = client.get_model_version(model_name, restored).tags
    click.echo(
        f"{model_name}: champion is version {restored} {'again' if was else 'now'}, in place of "
        f"version {demoted} (models:/{model_name}@champion)"
    )
    if not was and tags.get("fedrec.promotion_reason"):  # chosen by hand: say what its run said
        click.echo(
            f"note: version {restored} was never champion before; its run did not promote it: "
            f"{tags['fedrec.promotion_reason']}",
            err=True,
        )
    click.echo(
        f"runs on version {demoted}'s data and config train nothing; a server that loaded the "
        "champion serves the version it loaded until it restarts"
    )


def _decided(tag: str | None) -> bool | None:
    """A version's ``fedrec.promoted`` tag as JSON's true or false; None: not decided."""
    return {"true": True, "false": False}.get(tag or "")


def _number(tag: str | None) -> float | None:
    """A metric kept as a version tag (or a param), as a number; None when there is none."""
    try:
        return None if tag in (None, "") else float(tag)  # type: ignore[arg-type]
    except ValueError:
        return None


def run_rows(
    client: Any, limit: int, experiment: str | None = None, tracking_uri: str | None = None
) -> list[dict[str, Any]]:
    """The newest ``limit`` training runs of every experiment (or of ``experiment``), newest
    first, as MLflow records them: when each started and how long it ran (before a resume, time
    spent ended is left out), its status, its
    data, the version it registered and the promotion decision, or why it failed, and the
    ``--resume`` command of one that can be continued (``--tracking-uri`` in it when the
    client's store, ``tracking_uri``, is not the default one)."""
    import datetime

    from fedrec.model_store import PAUSED_TAG, resume_command, resume_possible

    found = client.search_experiments()
    names = {e.experiment_id: e.name for e in found}
    if experiment is not None:
        if experiment not in names.values():
            raise UserError(
                f"--experiment {experiment}: no such MLflow experiment; there are: "
                f"{', '.join(sorted(names.values())) or 'none'}"
            )
        names = {k: v for k, v in names.items() if v == experiment}
    experiments = list(names)
    if not experiments:
        return []
    runs = client.search_runs(
        experiments, "tags.`fedrec.config_hash` LIKE '%'",  # training runs, not the ledger's
        order_by=["attributes.start_time DESC"], max_results=limit,
    )  # fmt: skip
    rows = []
    for run in runs:
        info, tags = run.info, run.data.tags
        started = datetime.datetime.fromtimestamp(info.start_time / 1000, datetime.UTC)
        paused = float(tags.get(PAUSED_TAG, 0))  # a resumed run: time spent ended, left out
        took = None if info.end_time is None else (info.end_time - info.start_time) / 1000 - paused
        versions = client.search_model_versions(f"run_id='{info.run_id}'")
        version = versions[0] if versions else None
        # a RUNNING run may be running: it is offered for resume once it ended
        resumable = info.status in ("FAILED", "KILLED") and resume_possible(run, version)
        rows.append({
            "run_id": info.run_id,
            "experiment": names.get(info.experiment_id, ""),
            "name": info.run_name or "",
            "started": started.strftime("%Y-%m-%d %H:%M"),
            "started_at": started.isoformat(timespec="milliseconds"),  # the merge's order
            "seconds": None if took is None else round(took, 1),
            "paused_seconds": paused,
            "status": info.status,
            "source": next((run.data.params[k] for k in ("sites", "train", "data")
                            if run.data.params.get(k) not in (None, "", "None")), ""),
            "epsilon": _number(run.data.params.get("dp_epsilon")),  # None: not private
            "model": None if version is None else version.name,
            "version": None if version is None else str(version.version),
            "promoted": None if version is None else _decided(version.tags.get("fedrec.promoted")),
            "reason": None if version is None else version.tags.get("fedrec.promotion_reason"),
            "error": tags.get("fedrec.error"),
            "resume": resume_command(info.run_id, tracking_uri) if resumable else None,
            "prefect_flow_run_id": tags.get("prefect.flow_run_id"),
            "in_mlflow": True,
            # each metric's last logged value: the final evaluation's, for a run that finished
            "metrics": dict(sorted(run.data.metrics.items())),
        })  # fmt: skip
    return rows


# the state message's prefix Prefect adds to a flow's exception
_EXCEPTION_PREFIX = "Flow run encountered an exception: "


def _same_store(named: str | None, uri: str) -> bool:
    """Whether a flow run's ``tracking_uri`` parameter, ``named``, may be the store ``uri``: the
    same URI, or two SQLite URIs of one database file; a run that named none reported to the
    default where it ran, which may be this store."""
    from fedrec.model_store import resolve_tracking_uri, sqlite_path

    if not named:
        return True
    other = resolve_tracking_uri(named, create=False)
    a, b = sqlite_path(other), sqlite_path(uri)
    return other == uri or (a is not None and b is not None and a.resolve() == b.resolve())


def prefect_only_rows(
    client: Any, api_url: str, limit: int, uri: str, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """The newest ``limit`` training flow runs on the Prefect API at ``api_url`` that failed or
    crashed without an MLflow run in this store (``client``'s, ``uri``): refused before training
    (a deployment's bad parameter, a privacy-budget refusal, a store that did not answer) or
    killed while real sites enrolled. A flow run whose ``tracking_uri`` parameter names another
    store is left out. As :func:`run_rows`' rows, ``in_mlflow`` false.

    Raises
    ------
    OSError
        The API does not answer (or not as Prefect's does).
    """
    import datetime
    import json
    import urllib.request

    from fedrec.model_store import EARLIER_FLOW_RUNS_TAG

    query = {
        "flows": {"name": {"any_": ["federated-training"]}},
        "flow_runs": {"state": {"type": {"any_": ["FAILED", "CRASHED"]}}},
        "sort": "EXPECTED_START_TIME_DESC",
        "limit": limit,
    }
    request = urllib.request.Request(
        f"{api_url}/flow_runs/filter",
        data=json.dumps(query).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            found = json.loads(response.read())
    except ValueError as err:  # not JSON: not a Prefect API
        raise OSError(f"not a Prefect API answer: {err}") from err
    experiments = [e.experiment_id for e in client.search_experiments()]
    rows = []
    for run in found:
        parameters, state = run.get("parameters") or {}, run.get("state") or {}
        if not _same_store(parameters.get("tracking_uri"), uri):
            continue
        wheres = (f"tags.`prefect.flow_run_id` = '{run['id']}'",  # MLflow's filters have no OR
                  f"tags.`{EARLIER_FLOW_RUNS_TAG}` LIKE '%{run['id']}%'")  # fmt: skip
        if experiments and any(client.search_runs(experiments, w, max_results=1) for w in wheres):
            continue
        when = run.get("start_time") or run.get("expected_start_time") or ""
        started = datetime.datetime.fromisoformat(when.replace("Z", "+00:00")) if when else None
        message = (state.get("message") or "").removeprefix(_EXCEPTION_PREFIX)
        rows.append({
            "run_id": None,
            "experiment": "",
            "name": run.get("name", ""),
            "started": "" if started is None else started.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
            "started_at": "" if started is None
            else started.astimezone(datetime.UTC).isoformat(timespec="milliseconds"),
            "seconds": run.get("total_run_time"),
            "paused_seconds": 0.0,
            "status": state.get("type", ""),
            "source": next((str(parameters[k]) for k in ("sites", "train", "data")
                            if parameters.get(k) not in (None, "")), ""),
            "epsilon": _number(parameters.get("dp_epsilon")),
            "model": None, "version": None, "promoted": None, "reason": None,
            "error": message.splitlines()[0] if message else None,
            "resume": None,
            "prefect_flow_run_id": run["id"],
            "in_mlflow": False,
            "metrics": {},
        })  # fmt: skip
    return rows


def _with_prefect_only(
    client: Any, rows: list[dict[str, Any]], limit: int, uri: str
) -> list[dict[str, Any]]:
    """``rows`` and the failed flow runs the Prefect server has without an MLflow run, newest
    first, ``limit`` in all; a server that does not answer is said on stderr, and left out."""
    from fedrec import local_server
    from fedrec.cli import configured_api

    api = configured_api()
    if api is None:
        state = local_server.read_state()
        if state is None:  # no server: no flow run to add
            return rows
        api = state.api_url
    try:
        found = prefect_only_rows(client, api, limit, uri)
    except OSError as err:
        reason = getattr(err, "reason", err)
        click.echo(
            f"fedrec: the Prefect API at {api} does not answer ({reason}): runs that failed "
            "before their MLflow run are not listed",
            err=True,
        )
        return rows
    merged = sorted([*rows, *found], key=lambda r: r["started_at"], reverse=True)
    return merged[:limit]


def _outcome(row: dict[str, Any]) -> str:
    """What a run came to, in words (a private run's epsilon first): its version's decision, its
    error, or that it runs."""
    if row["epsilon"] is not None:
        return f"private, epsilon {row['epsilon']:g}: " + _outcome(row | {"epsilon": None})
    if row["version"] is not None:
        decided = {True: "promoted", False: "not promoted"}.get(row["promoted"], "undecided")
        why = f": {row['reason']}" if row["reason"] else ""
        return f"{row['model']} version {row['version']} {decided}{why}"
    if row["status"] == "RUNNING":
        return "running (or lost: the next run closes it if Prefect shows it over)"
    what = row["error"] or ("registered nothing" if row["status"] == "FINISHED" else "no error")
    if not row.get("in_mlflow", True):
        what += " (Prefect flow run; it ended before its MLflow run)"
    return what + (f"; {row['resume']} continues it" if row["resume"] else "")


@click.command()
@_tracking_uri_option
@click.option(
    "--limit", default=10, show_default=True, type=click.IntRange(min=1), help="newest runs shown"
)
@click.option("--experiment", default=None, help="one MLflow experiment [default: every one]")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per run on stdout")
@debug_option
@friendly_errors
def runs(tracking_uri: str | None, limit: int, experiment: str | None, as_json: bool) -> None:
    """The newest training runs in MLflow: when each started, how long it took, whether it
    finished, the version it registered and whether that became champion, or the error it
    failed with and how to continue it. With them, the training flow runs that failed on the
    Prefect server (PREFECT_API_URL's, else fedrec's local one) before they had an MLflow run:
    a deployment's bad parameter, a privacy-budget refusal, a store that did not answer. A
    command refused before it started (bad data, a bad setting) is in neither.

    \b
    fedrec runs
    fedrec runs --limit 3 --json
    """
    import json

    from fedrec.cli import _status

    with _status("loading MLflow and reading the runs"):  # shown on a terminal only
        from mlflow import MlflowClient

        uri = _store_uri(tracking_uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        rows = run_rows(client, limit, experiment, tracking_uri=uri)
    if experiment is None:  # a flow run without an MLflow run is in no experiment
        rows = _with_prefect_only(client, rows, limit, uri)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows and experiment is not None:
        others = [r["experiment"] for r in run_rows(client, 1, tracking_uri=uri)]
        where = f"; the newest is in experiment {others[0]}" if others else ""
        click.echo(f"no training runs in experiment {experiment} of {uri}{where}")
        return
    if not rows:
        click.echo(f"no training runs in {uri}; train one first (fedrec train)")
        return
    click.echo("started (UTC)     took     status    run                       outcome")
    for r in rows:
        took = "-" if r["seconds"] is None else f"{r['seconds']:.0f} s"
        click.echo(
            f"{r['started']:<17} {took:<8} {r['status']:<9} {r['name'][:25]:<25} {_outcome(r)}"
        )
