"""The words `fedrec runs` and `fedrec models` print for a run or a version, and which failed
Prefect flow runs `fedrec runs` counts as this store's: pure functions of what MLflow and
Prefect recorded, read here without a store. ``tests/flows/test_cli.py`` runs the commands."""

from __future__ import annotations

import pytest

from fedrec.cli_models import _decided, _number, _outcome, _promoted, _same_store


def _run_row(**fields) -> dict:
    row = {"epsilon": None, "version": None, "model": None, "promoted": None, "reason": None,
           "status": "FINISHED", "error": None, "resume": None, "in_mlflow": True}  # fmt: skip
    return row | fields


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"model": "m", "version": "3", "promoted": True, "reason": "valid/rmse 0.91 < 0.95"},
         "m version 3 promoted: valid/rmse 0.91 < 0.95"),
        ({"model": "m", "version": "4", "promoted": False, "reason": ""},
         "m version 4 not promoted"),
        ({"model": "m", "version": "5"}, "m version 5 undecided"),
        ({"model": "m", "version": "6", "promoted": True, "epsilon": 2.5, "reason": "first"},
         "private, epsilon 2.5: m version 6 promoted: first"),
        ({"status": "RUNNING"},
         "running (or lost: the next run closes it if Prefect shows it over)"),
        ({}, "registered nothing"),
        ({"status": "KILLED"}, "no error"),
        ({"status": "FAILED", "error": "DataValidationError: bad row",
          "resume": "fedrec train --resume abc"},
         "DataValidationError: bad row; fedrec train --resume abc continues it"),
        ({"status": "FAILED", "error": "refused", "in_mlflow": False, "epsilon": 1.0},
         "private, epsilon 1: refused (Prefect flow run; it ended before its MLflow run)"),
    ],
)  # fmt: skip
def test_a_runs_outcome_in_words(fields, words):
    assert _outcome(_run_row(**fields)) == words


@pytest.mark.parametrize(
    ("fields", "shown"),
    [
        ({"promoted": True}, "true"),
        ({"promoted": False}, "false"),
        ({"promoted": None}, "-"),
        ({"promoted": True, "replaced_by": "7"}, "replaced"),
        ({"promoted": True, "replaced_by": "7", "champion": True}, "true"),  # champion again
        ({"promoted": False, "replaced_by": "7"}, "false"),
        ({"promoted": True, "rolled_back": "2026-12-01: to 2, why"}, "demoted"),
    ],
)
def test_a_versions_promoted_column(fields, shown):
    row = {"promoted": None, "replaced_by": None, "champion": False, "rolled_back": None}
    assert _promoted(row | fields) == shown


def test_tags_read_as_a_decision_and_as_numbers():
    assert [_decided(t) for t in ("true", "false", None, "", "yes")] == [
        True, False, None, None, None
    ]  # fmt: skip
    assert [_number(t) for t in ("0.5", "1e-3", "-2", None, "", "n/a")] == [
        0.5, 0.001, -2.0, None, None, None
    ]  # fmt: skip


def test_a_flow_runs_store_is_this_one_by_uri_or_by_its_sqlite_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = "http://127.0.0.1:5000"

    assert _same_store(None, here) and _same_store("", server)  # named none: maybe this one
    assert _same_store(server, server)  # the same server, though no file names it
    assert not _same_store("http://127.0.0.1:5001", server)
    assert _same_store("sqlite:///mlflow.db", here)  # relative: from this command's folder
    assert _same_store(here + "?timeout=30", here)
    assert not _same_store(f"sqlite:///{tmp_path / 'other.db'}", here)
    assert not _same_store(here, server) and not _same_store(server, here)


def test_an_ids_file_is_read_stripped_and_renamed_and_a_missing_id_names_its_row(tmp_path):
    from fedrec.cli_models import _read_ids
    from models.data.errors import DataValidationError

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("user_id,item_id\nu1,i1\nu2, i2 \n")
    assert _read_ids(str(pairs), {"user_id": "uid", "item_id": "item_id"}).to_dict("list") == {
        "uid": ["u1", "u2"], "item_id": ["i1", "i2"]
    }  # fmt: skip
    pairs.write_text("user_id,item_id\nu1,i1\nu2,i2\n  ,i3\n")
    with pytest.raises(DataValidationError) as missing:
        _read_ids(str(pairs), {"user_id": "user_id", "item_id": "item_id"})
    assert str(missing.value) == (
        f"{pairs}, row 3 (line 4), column 'user_id': missing id; allowed: an id in every row of "
        "user_id, item_id"
    )
    allowed = "allowed: a CSV file with column(s) user_id, item_id"
    for content, said in ((b"", "is empty (0 bytes)"), (b"user_id,item_id\n", "has no data rows")):
        pairs.write_bytes(content)
        with pytest.raises(DataValidationError) as empty:
            _read_ids(str(pairs), {"user_id": "user_id", "item_id": "item_id"})
        assert str(empty.value).startswith(f"{pairs}: {said}; "), empty.value
    pairs.unlink()
    with pytest.raises(DataValidationError) as gone:
        _read_ids(str(pairs), {"user_id": "user_id", "item_id": "item_id"})
    assert str(gone.value) == f"{pairs}: no such file; {allowed}"


def test_users_without_a_history_row_are_named_up_to_three(capsys):
    import pandas as pd

    from fedrec.cli_models import _note_users_without_history

    def note(histories: dict) -> str:
        requests = pd.DataFrame(
            {"user_id": list(histories), "history_items": list(histories.values())}
        )
        _note_users_without_history(requests, "h.csv")
        return capsys.readouterr().err.strip()

    assert note({"a": ["i1"], "b": ["i2"]}) == ""
    three = note({"a": [], "b": ["i2"], "c": [], "d": []})
    four = note({"a": [], "b": [], "c": [], "d": [], "e": ["i1"]})

    assert three == (
        "fedrec: note: 3 of 4 user(s) of --users (a, c, d) have no row in h.csv: they get the "
        "most popular items, as a new user does"
    )
    assert four.startswith("fedrec: note: 4 of 5 user(s) of --users (a, b, c, ...) have no row")


def test_histories_of_items_the_model_does_not_know_are_named_up_to_three(capsys):
    import types

    import pandas as pd

    from fedrec.cli_models import _note_unknown_histories

    model = types.SimpleNamespace(known_items=[1, 2, 3])  # read as text, as histories are

    def note(histories: dict) -> str:
        requests = pd.DataFrame(
            {"user_id": list(histories), "history_items": list(histories.values())}
        )
        _note_unknown_histories(requests, model)
        return capsys.readouterr().err.strip()

    assert note({"a": ["1"], "b": [], "c": ["9", "2"]}) == ""  # b has none: no line for it
    three = note({"a": ["7"], "b": ["8", "9"], "c": ["1"], "d": ["x"]})
    four = note({"a": ["7"], "b": ["8"], "c": ["x"], "d": ["y"], "e": []})

    assert three == (
        "fedrec: note: 3 of 4 user(s) (a, b, d) have no history item this model knows: they "
        "get the most popular items (is it the right model, and --item-col the right column?)"
    )
    assert four.startswith("fedrec: note: 4 of 5 user(s) (a, b, c, ...) have no history item")


def test_each_unscored_pair_says_why_and_each_user_what_of_the_history_was_ignored(capsys):
    import types

    import numpy as np
    import pandas as pd

    from fedrec.cli_models import _report_unscored
    from models.recommenders import NO_HISTORY

    model = types.SimpleNamespace(known_items=[1, 2, 3, 4])
    requests = pd.DataFrame({"user_id": ["a", "b", "c"],
                             "history_items": [["1", "x"], ["2"], []]})  # fmt: skip
    cold = f"{NO_HISTORY}: most popular items"
    answered = pd.DataFrame(
        [("a", "9", np.nan, np.nan),  # not known
         ("a", "1", np.nan, np.nan),  # in a's history
         ("a", "3", 4.1, "predicted rating 4.1 from your ratings of 1 item; ignored 1 unknown "
          "item(s): x"),
         ("b", "3", np.nan, np.nan),  # the model left it out and said nothing
         ("b", "4", np.nan, ""),
         ("c", "2", np.nan, cold),  # said on its pair's line: not again on the user's
         ("c", "3", np.nan, cold)],
        columns=["user_id", "item_id", "score", "reason"],
    )  # fmt: skip

    _report_unscored(answered, requests, model)

    assert capsys.readouterr().err.splitlines() == [
        "fedrec: note: user a, item 9: no score: not an item this model knows",
        "fedrec: note: user a, item 1: no score: already in the user's history (this model "
        "scores only new items)",
        "fedrec: note: user b, item 3: no score: the model gave none",
        "fedrec: note: user b, item 4: no score: the model gave none",
        f"fedrec: note: user c, item 2: no score: {cold}",
        f"fedrec: note: user c, item 3: no score: {cold}",
        "fedrec: note: user a: ignored 1 unknown item(s): x",
    ]


def test_a_rating_models_history_without_ratings_is_refused_naming_the_column_and_scale(tmp_path):
    import types

    from fedrec.cli_errors import UserError
    from fedrec.cli_models import _requests

    history = tmp_path / "h.csv"
    history.write_text("user_id,item_id\nu1,i1\nu1,i2\n")
    columns = {"user_col": "user_id", "item_col": "item_id", "rating_col": "rating"}

    with pytest.raises(UserError) as refused:
        _requests(str(history), None, columns, types.SimpleNamespace(rating_scale=(1.0, 5.0)))

    assert refused.value.message.startswith(
        f"{history}: no rating column 'rating': this model predicts ratings from the user's own; "
        "allowed: ratings in [1, 5] (--rating-col names their column)"
    )
    ranked = _requests(str(history), None, columns, types.SimpleNamespace())  # no scale: any
    assert ranked["user_id"].tolist() == ["u1"]
    assert ranked["history_items"].tolist() == [["i1", "i2"]]
