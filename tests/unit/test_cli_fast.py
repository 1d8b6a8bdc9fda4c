"""The command line answers before it loads heavy libraries or starts a server: `fedrec --help`
imports none of them, and a missing or malformed data file is refused in one line by the core's
readers, before Prefect, MLflow or the models are imported. Each case runs in a fresh process,
as a user's command would."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

HEAVY = ("prefect", "mlflow", "sklearn", "lightgbm", "pandas", "scipy", "pydantic")
# A problem of settings together, which the configuration reports after the data check (a
# setting out of its own bounds is named before the data's problem): a command that stops with
# it got past the data check.
PAST_THE_DATA = ["--dp-budget", "1"]
PAST_THE_DATA_ERROR = "invalid configuration: dp_budget needs dp_epsilon"
GOOD_ROWS = "".join(
    f"u{u},i{(u * 7 + j) % 40},{1 + (u + j) % 5}\n" for u in range(30) for j in range(5)
)

# Runs the CLI in this interpreter and prints, at exit, which heavy modules it had imported.
_PROBE = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules))))
from fedrec.cli import main
main({args!r})
"""


@pytest.fixture(scope="module", autouse=True)
def _flag_descriptions_cached() -> None:
    """The flags' descriptions are cached at the first command after an install or a change of
    the sources, which imports the models once; these tests check the commands after it."""
    subprocess.run(
        [sys.executable, "-c", "from fedrec.config_flags import config_fields; config_fields()"],
        check=True, timeout=300,
    )  # fmt: skip


def _cli(args: list[str], home: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"FEDREC_HOME": str(home)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE.format(heavy=HEAVY, args=args)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:  # a command that went further than it should, to its timeout too: stop its
        if (home / "server").exists():  # server, and let the test's assertion say so
            from fedrec.local_server import stop

            stop(home=home)
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    return done, imported


def _assert_one_line_error(
    done: subprocess.CompletedProcess[str], *parts: str, status: int = 2
) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == status, done.stderr
    assert len(lines) == 1 and lines[0].startswith("fedrec: error: "), done.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def _assert_nothing_started(home: Path) -> None:
    assert not (home / "server").exists(), list((home / "server").iterdir())
    assert not (home / "mlflow.db").exists()


def test_top_level_help_imports_no_heavy_library(tmp_path):
    done, imported = _cli(["--help"], tmp_path)

    assert done.returncode == 0, done.stderr
    for command in ("train", "recommend", "predict", "serve", "server"):
        assert f"\n  {command} " in done.stdout, command
    assert imported == []


@pytest.mark.parametrize("command", ["recommend", "predict", "models", "runs"])
def test_the_serving_commands_help_imports_no_heavy_library(tmp_path, command):
    done, imported = _cli([command, "--help"], tmp_path)

    assert done.returncode == 0 and "--tracking-uri" in done.stdout, done.stderr
    assert imported == []


def test_a_bare_fedrec_prints_the_help_and_version_prints_the_version(tmp_path):
    from importlib.metadata import version

    bare, imported = _cli([], tmp_path)
    shown, _ = _cli(["--version"], tmp_path)

    assert bare.returncode == 0 and bare.stderr == "", bare.stderr
    # (the probe runs `python -c`: its program name stands where `fedrec` would)
    assert bare.stdout.startswith("Usage: ") and "[OPTIONS] COMMAND" in bare.stdout
    assert "\n  train " in bare.stdout and imported == []
    assert shown.returncode == 0 and shown.stdout.splitlines()[0] == f"fedrec {version('fedrec')}"


@pytest.mark.parametrize("command", ["train", "budget"])  # budget takes train's flags
def test_train_help_comes_from_the_flag_cache_without_the_config(tmp_path, command):
    _cli([command, "--help"], tmp_path)  # builds the cache if the sources changed

    done, imported = _cli([command, "--help"], tmp_path)

    assert done.returncode == 0, done.stderr
    assert "--rounds INTEGER" in done.stdout and "federated rounds (default: 10;" in done.stdout
    assert "--partition [iid|dirichlet|by-key|per-user]" in done.stdout
    assert imported == []


def test_the_flag_cache_describes_the_config_as_it_is():
    from fedrec.config import TrainingConfig
    from fedrec.config_flags import config_defaults, config_fields, describe_fields

    assert config_fields() == describe_fields()
    defaults = config_defaults()
    assert set(defaults) == set(TrainingConfig.model_fields)
    assert defaults["rounds"] == TrainingConfig().rounds
    assert tuple(defaults["rating_scale"]) == TrainingConfig().rating_scale


def test_a_missing_file_is_refused_before_any_library_or_server_loads(tmp_path):
    missing = tmp_path / "missing.csv"

    done, imported = _cli(["train", "--data", str(missing)], tmp_path / "home")

    _assert_one_line_error(done, f"data={str(missing)!r}: no such file or folder")
    assert (
        "; allowed: an existing file (.csv, .tsv, .txt, .csv.gz, .tsv.gz, .txt.gz, .parquet, .pq), a MovieLens ratings file (.data, .base, .test, .dat), a MovieLens folder"
        in (done.stderr)
    )
    assert not set(imported) & {"prefect", "mlflow", "sklearn", "lightgbm"}, imported
    _assert_nothing_started(tmp_path / "home")


def test_a_bad_setting_is_refused_before_the_models_libraries_load(tmp_path):
    done, imported = _cli(["train", "--rounds", "-1"], tmp_path / "home")

    _assert_one_line_error(done, "rounds (--rounds)", "-1")
    # the configuration is checked with pydantic; LightGBM and scikit-learn load only to train
    assert not set(imported) & {"prefect", "mlflow", "sklearn", "lightgbm"}, imported
    _assert_nothing_started(tmp_path / "home")


def test_a_partition_key_that_is_not_one_value_per_user_is_refused_at_its_row(tmp_path):
    data = tmp_path / "shop.csv"
    data.write_text("user_id,item_id,rating,region\nu1,i1,4,north\nu2,i1,3,south\nu1,i2,5,west\n")

    done, imported = _cli(
        ["train", "--data", str(data), "--partition", "by-key", "--partition-key", "region"],
        tmp_path / "home",
    )

    _assert_one_line_error(
        done, f"{data}, row 3 (line 4), column 'region': value 'west' differs from 'north' on row 1, the "
        "first row of user 'u1'; allowed: one value per user",
    )  # fmt: skip
    assert not set(imported) & {"prefect", "mlflow", "sklearn", "lightgbm"}, imported
    _assert_nothing_started(tmp_path / "home")


def test_a_side_feature_the_re_ranker_cannot_read_is_refused_before_anything_starts(tmp_path):
    data = tmp_path / "clicks.csv"
    data.write_text("customer,sku,gender\nc1,a,F\nc2,a,\nc3,b,female\n")
    flags = ["--user-col", "customer", "--item-col", "sku", "--feedback", "implicit"]

    done, imported = _cli(["train", "--data", str(data), *flags, "--ranker", "lightgbm"],
                          tmp_path / "home")  # fmt: skip

    _assert_one_line_error(
        done, f"{data}, row 3 (line 4), column 'gender': value 'female' is not a valid gender; "
        "allowed: M or F (either case), or an empty cell (unknown)",
    )  # fmt: skip
    assert not set(imported) & {"prefect", "mlflow", "sklearn", "lightgbm"}, imported
    _assert_nothing_started(tmp_path / "home")


def test_a_test_file_whose_rows_the_training_file_has_is_refused_before_anything_starts(
    tmp_path,
):
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("user_id,item_id,rating\n" + GOOD_ROWS)
    test.write_text("user_id,item_id,rating\n" + GOOD_ROWS.splitlines()[7] + "\nu99,i1,4\n")

    done, imported = _cli(["train", "--train", str(train), "--test", str(test)], tmp_path / "home")

    _assert_one_line_error(
        done, f"{test}: 1 of 2 rows have a (user, item) pair the training file {train} also has",
        "allowed: held-out rows of pairs the other split files lack",
    )  # fmt: skip
    assert not set(imported) & {"prefect", "mlflow", "sklearn", "lightgbm"}, imported
    _assert_nothing_started(tmp_path / "home")


def test_a_validation_file_goes_with_train_and_test_and_is_checked_against_them(tmp_path):
    rows = GOOD_ROWS.splitlines()
    train, valid, test = (tmp_path / f"{name}.csv" for name in ("train", "valid", "test"))
    train.write_text("user_id,item_id,rating\n" + "\n".join(rows[2:]) + "\n")
    test.write_text(f"user_id,item_id,rating\n{rows[0]}\n")
    splits = ["--train", str(train), "--valid", str(valid), "--test", str(test)]

    valid.write_text(f"user_id,item_id,rating\n{rows[1]}\n")
    done, _ = _cli(["train", *splits, *PAST_THE_DATA], tmp_path / "home")
    # the three files pass their check: the run stops at the next one, the config's
    _assert_one_line_error(done, PAST_THE_DATA_ERROR)

    valid.write_text(f"user_id,item_id,rating\n{rows[1]}\n{rows[5]}\n")
    done, _ = _cli(["train", *splits], tmp_path / "home")
    _assert_one_line_error(
        done, f"{valid}: 1 of 2 rows have a (user, item) pair the training file {train} also has"
    )
    done, _ = _cli(["train", "--valid", str(valid)], tmp_path / "home")
    _assert_one_line_error(done, "--valid needs --train and --test")
    _assert_nothing_started(tmp_path / "home")


def test_a_bad_header_names_file_column_and_what_is_allowed(tmp_path):
    data = tmp_path / "ratings.csv"
    data.write_text("user_id,itemid,rating\n" + GOOD_ROWS)

    done, imported = _cli(["train", "--data", str(data)], tmp_path / "home")

    _assert_one_line_error(
        done, str(data), "column 'item_id'", "did you mean 'itemid'?",
        "allowed: one of the columns present: 'user_id', 'itemid', 'rating'",
    )  # fmt: skip
    assert not set(imported) & {"prefect", "mlflow", "sklearn", "lightgbm"}, imported
    _assert_nothing_started(tmp_path / "home")


def test_a_column_named_twice_is_refused_not_renamed(tmp_path):
    data = tmp_path / "ratings.csv"
    data.write_text("user_id,item_id,rating,rating\n" + GOOD_ROWS.replace("\n", ",9\n"))

    done, _ = _cli(["train", "--data", str(data)], tmp_path / "home")

    _assert_one_line_error(
        done, str(data), "column 'rating'", "named 2 times in the header", "each column named once"
    )
    _assert_nothing_started(tmp_path / "home")


def test_more_clients_than_users_is_refused_before_any_library_or_server_loads(tmp_path):
    data = tmp_path / "ratings.csv"
    data.write_text("user_id,item_id,rating\n" + GOOD_ROWS)
    users = len({line.split(",")[0] for line in GOOD_ROWS.splitlines()})

    done, imported = _cli(["train", "--data", str(data), "--clients", "40"], tmp_path / "home")

    _assert_one_line_error(
        done, str(data), "setting 'clients'", "value 40", f"users ({users})", f"1..{users}"
    )
    assert not set(imported) & {"prefect", "mlflow", "sklearn", "lightgbm"}, imported
    _assert_nothing_started(tmp_path / "home")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--clients", "5000"], ["synthetic(seed=0, n_users=2000", "setting 'clients'",
                                 "value 5000 is more clients than the data has users (2000)", "allowed: 1..2000"]),
        (["--synthetic-users", "300", "--clients", "301", "--partition", "dirichlet"],
         ["value 301 is more clients than the data has users (300)"]),
        (["--synthetic-interactions", "10"], ["n_interactions=10 is out of range for 2000 users"]),
    ],
)  # fmt: skip
def test_what_the_synthetic_data_cannot_have_is_refused_before_any_server_or_run(
    tmp_path, flags, expected
):
    """The built-in data is generated and checked as a file would be: such a run reached the
    Prefect server and left a failed MLflow run behind before sharding refused it."""
    done, imported = _cli(["train", *flags], tmp_path / "home")

    _assert_one_line_error(done, *expected)
    assert not set(imported) & {"prefect", "mlflow", "lightgbm"}, imported
    _assert_nothing_started(tmp_path / "home")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--split", "temporal"], ["column 'timestamp'", "a temporal split needs timestamps",
                                   "allowed: data with a timestamp column (--timestamp-col names it), or split=random"]),
        (["--partition", "by-key", "--partition-key", "occupation"],
         ["ratings.csv, column 'occupation': column not found",
          "allowed: one of the columns present: 'user_id', 'item_id', 'rating'"]),
        (["--model-name", "shop/a"], ["model_name='shop/a'", "allowed: letters, digits"]),
    ],
)  # fmt: skip
def test_a_split_or_partition_the_data_cannot_have_is_refused_before_anything_starts(
    tmp_path, flags, expected
):
    data = tmp_path / "ratings.csv"
    data.write_text("user_id,item_id,rating\n" + GOOD_ROWS)

    done, imported = _cli(["train", "--data", str(data), *flags], tmp_path / "home")

    _assert_one_line_error(done, *expected)
    assert not set(imported) & {"prefect", "mlflow"}, imported
    _assert_nothing_started(tmp_path / "home")


def test_more_clients_than_key_values_is_refused_before_anything_starts(tmp_path):
    """A by-key partition's client count is checked with the data's other columns: refused
    before any server or MLflow run (a failed run in MLflow would say, to its readers, whether
    the data holds one more value)."""
    from models.data.readers import DATASETS_ENV, datasets_dir

    folder = datasets_dir() / "ml-100k"
    if not folder.is_dir():
        pytest.skip(f"MovieLens ml-100k not found at {folder} (set ${DATASETS_ENV} to its parent)")
    flags = ["--partition", "by-key", "--partition-key", "gender", "--clients", "3"]

    done, _ = _cli(["train", "--data", str(folder), *flags], tmp_path / "home")

    _assert_one_line_error(done, "setting 'clients'", "value 3", "distinct values (2)", "1..2")
    _assert_nothing_started(tmp_path / "home")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--partition-key", "gender", "--clients", "5"],
         ["setting 'partition_key'", "value 'gender'", "allowed: age, occupation, region"]),
        (["--partition-key", "region", "--clients", "500"],
         ["setting 'clients'", "value 500", "distinct values (10)"]),
    ],
)  # fmt: skip
def test_a_by_key_partition_of_the_built_in_data_is_checked_before_anything_starts(
    tmp_path, flags, expected
):
    done, imported = _cli(["train", "--partition", "by-key", *flags], tmp_path / "home")

    _assert_one_line_error(done, *expected)
    assert not set(imported) & {"prefect", "mlflow"}, imported
    _assert_nothing_started(tmp_path / "home")


def test_a_bad_value_names_its_row(tmp_path):
    data = tmp_path / "ratings.csv"
    data.write_text("user_id,item_id,rating\n" + GOOD_ROWS + "u1,i3,9\n")
    row = GOOD_ROWS.count("\n") + 1

    done, _ = _cli(["train", "--data", str(data)], tmp_path / "home")

    _assert_one_line_error(
        done, str(data), f"row {row}", "column 'rating'", "9", "outside the rating scale"
    )
    _assert_nothing_started(tmp_path / "home")


def test_a_large_file_is_checked_by_its_head_and_errors_name_the_real_file(tmp_path):
    from fedrec.inputs import WHOLE_FILE_BYTES

    data = tmp_path / "big.csv"
    rows = GOOD_ROWS * (WHOLE_FILE_BYTES // len(GOOD_ROWS) + 1)
    data.write_text("user,item_id,rating\n" + rows)
    assert data.stat().st_size > WHOLE_FILE_BYTES

    done, _ = _cli(["train", "--data", str(data)], tmp_path / "home")

    line = _assert_one_line_error(done, f"fedrec: error: {data}, column 'user_id'")
    assert "fedrec-check-" not in line  # not the temporary copy of the head
    _assert_nothing_started(tmp_path / "home")


def test_a_large_files_head_is_cut_after_a_whole_row(tmp_path):
    from fedrec.inputs import HEAD_BYTES, WHOLE_FILE_BYTES

    header = "user_id,item_id,rating\n"
    row = "{:06d},{:05d},{}\n"
    width = len(row.format(0, 0, 1))
    data = tmp_path / "big.csv"
    n_rows = WHOLE_FILE_BYTES // width + 1
    data.write_text(
        header + "".join(row.format(u % 999, u % 997, 1 + u % 5) for u in range(n_rows))
    )
    # the head's last byte falls inside a row, before its rating: read as it falls, that row
    # would have no rating
    assert 0 < (HEAD_BYTES - len(header)) % width < width - 2

    done, _ = _cli(["train", "--data", str(data), *PAST_THE_DATA], tmp_path / "home")

    # the data passes its check: the run stops at the next one, the config's
    _assert_one_line_error(done, PAST_THE_DATA_ERROR)


def test_a_gender_column_is_checked_only_for_the_model_that_reads_it(tmp_path):
    data = tmp_path / "with_gender.csv"
    rows = GOOD_ROWS.splitlines()
    data.write_text(
        "user_id,item_id,rating,gender\n"
        + "".join(f"{line},{'X' if n == 7 else 'F'}\n" for n, line in enumerate(rows))
    )

    done, _ = _cli(["train", "--data", str(data), "--feedback", "implicit", "--ranker", "lightgbm"],
                   tmp_path / "home")  # fmt: skip
    _assert_one_line_error(done, str(data), "row 8", "column 'gender'", "X", "M or F")
    # a model without the re-ranker reads no gender: its data passes, the run stops at the config
    for model in (["--feedback", "explicit"], ["--feedback", "implicit", "--ranker", "none"],
                  ["--feedback", "implicit", "--implicit-model", "neural", "--ranker", "lightgbm"]):  # fmt: skip
        done, _ = _cli(["train", "--data", str(data), *model, *PAST_THE_DATA], tmp_path / "home")
        _assert_one_line_error(done, PAST_THE_DATA_ERROR)
    _assert_nothing_started(tmp_path / "home")


def test_data_without_ratings_is_refused_before_anything_starts_unless_implicit(tmp_path):
    data = tmp_path / "clicks.csv"
    data.write_text("user_id,item_id\n" + "".join(f"u{u},i{u % 9}\n" for u in range(60)))

    done, _ = _cli(["train", "--data", str(data)], tmp_path / "home")
    _assert_one_line_error(done, f"{data}, column 'rating': has no ratings", "--feedback implicit")
    _assert_nothing_started(tmp_path / "home")
    done, _ = _cli(["train", "--data", str(data), "--feedback", "implicit", *PAST_THE_DATA],
                   tmp_path / "home")  # fmt: skip
    _assert_one_line_error(done, PAST_THE_DATA_ERROR)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"rounds: 2\nexperiment: caf\xe9\n", "byte 0xe9 at byte offset 25 is not valid UTF-8; "
         "allowed: UTF-8 text; if the file is latin-1, re-encode it"),
        ("rounds: 2\n".encode("utf-16"), "byte 0xff at byte offset 0 is not valid UTF-8; "
         "allowed: UTF-8 text; the file is UTF-16, re-encode it (iconv -f utf-16 -t utf-8"),
        (None, "is a folder; allowed: a YAML config file"),
    ],
)  # fmt: skip
def test_a_config_file_that_is_not_utf8_text_is_named_in_one_line(tmp_path, content, expected):
    config = tmp_path / "run.yaml"
    if content is None:
        config.mkdir()
    else:
        config.write_bytes(content)

    done, _ = _cli(["train", "--config", str(config)], tmp_path / "home")

    _assert_one_line_error(done, f"fedrec: error: {config}: {expected}")
    _assert_nothing_started(tmp_path / "home")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--seed", "-1"], "invalid configuration: seed (--seed): Input should be greater than "
         "or equal to 0 (got -1)"),
        # the setting's own bound, not what the data check made of it (too many clients)
        (["--partition", "by-key", "--partition-key", "region", "--key-prefix", "-1",
          "--clients", "3"], "key_prefix (--key-prefix): Input should be greater than or equal "
         "to 1 (got -1)"),
        (["--train", "{tmp}/ratings.csv", "--test", "{tmp}/test.csv"], "invalid configuration: "
         "data='{tmp}/ratings.csv' with train and test files: the run would read only the split "
         "files; give --data, or --train and --test, not both"),
    ],
)  # fmt: skip
def test_a_setting_out_of_its_bounds_is_named_before_the_data_is_used(tmp_path, flags, expected):
    data, test = tmp_path / "ratings.csv", tmp_path / "test.csv"
    data.write_text(
        "user_id,item_id,rating,region\n"
        + "".join(f"{u},{i},4,r{u % 2}\n" for u in range(4) for i in range(3))
    )
    test.write_text("user_id,item_id,rating\n1,9,4\n")
    flags = [flag.format(tmp=tmp_path) for flag in flags]

    done, _ = _cli(["train", "--data", str(data), *flags], tmp_path / "home")

    _assert_one_line_error(done, expected.format(tmp=tmp_path))
    _assert_nothing_started(tmp_path / "home")


def test_other_column_names_and_rating_scale_are_flags(tmp_path):
    data = tmp_path / "stars.csv"
    data.write_text(
        "uid;movie;stars\n"
        + "".join(f"u{u};m{u % 7};{0.5 if u % 10 == 9 else 1 + u % 5}\n" for u in range(40))
    )
    columns = ["--user-col", "uid", "--item-col", "movie", "--rating-col", "stars"]

    done, _ = _cli(["train", "--data", str(data), *columns], tmp_path / "home")
    _assert_one_line_error(
        done, str(data), "row 10", "column 'stars'", "value 0.5", "[1.0, 5.0] (rating_scale)"
    )
    # With the scale, the data passes its check: the run stops at the next one, the config's.
    for scale in ("0.5,5", "data"):
        done, _ = _cli(["train", "--data", str(data), *columns, "--rating-scale", scale,
                        *PAST_THE_DATA], tmp_path / "home")  # fmt: skip
        _assert_one_line_error(done, PAST_THE_DATA_ERROR)
    done, _ = _cli(
        ["train", "--data", str(data), *columns, "--rating-scale", "5,x"], tmp_path / "home"
    )
    _assert_one_line_error(done, "rating_scale='5,x': expected LOW,HIGH")
    _assert_nothing_started(tmp_path / "home")


def test_a_site_takes_the_rating_scale_as_train_does(tmp_path):
    from click.testing import CliRunner

    from fedrec.cli import main

    key = tmp_path / "site.key"
    key.write_text("not read: the scale is checked first")
    site = ["site", "run", "--name", "shop", "--data", str(tmp_path / "rows.csv"),
            "--prefect-api", "http://127.0.0.1:9/api", "--mlflow", "http://127.0.0.1:9",
            "--identity", str(key), "--coordinator-key", "k", "--state-dir", str(tmp_path)]  # fmt: skip

    result = CliRunner().invoke(main, [*site, "--rating-scale", "0.5 5"])

    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "fedrec: error: rating_scale='0.5 5': expected LOW,HIGH (two numbers, e.g. 0.5,5) or "
        "'data' (take the scale from the data)"
    )


def test_site_prune_removes_old_answers_says_what_and_refuses_a_torn_record_in_one_line(
    tmp_path,
):
    from click.testing import CliRunner

    from fedrec.cli import main
    from models.sites.answers import ANSWERS, RECORD, SiteRecord

    record = SiteRecord(tmp_path / "state" / "record")
    record.keep(("run-a", "train", "train", 1, ""), None, b"x" * 2_000_000)
    record.keep(("run-b", "train", "train", 1, ""), None, b"y" * 10)
    (old,) = [
        p for p in (tmp_path / "state" / "record" / ANSWERS).iterdir() if p.stat().st_size > 10
    ]
    os.utime(old, (old.stat().st_mtime - 8 * 86400,) * 2)
    prune = ["site", "prune", "--state-dir", str(tmp_path / "state")]

    dry = CliRunner().invoke(main, [*prune, "--dry-run"])
    done = CliRunner().invoke(main, prune)

    folder = tmp_path / "state" / "record"
    assert (dry.exit_code, dry.output.strip()) == (
        0, f"would remove 1 kept answer of 1 run (2.0 MB), older than 7 days, from {folder}"
    )  # fmt: skip
    assert (done.exit_code, done.output.strip()) == (
        0, f"removed 1 kept answer of 1 run (2.0 MB), older than 7 days, from {folder}; asked "
           "again, they are refused"
    )  # fmt: skip
    assert not old.exists() and len(list((folder / ANSWERS).iterdir())) == 1
    with (folder / RECORD).open("a") as out:
        out.write('{"key_hash": "torn\n')
    torn = CliRunner().invoke(main, prune)
    assert torn.exit_code == 2, torn.output
    assert torn.stderr.strip() == f"fedrec: error: {folder / RECORD}: line 4 is not a record entry"
    nowhere = CliRunner().invoke(main, ["site", "prune", "--state-dir", str(tmp_path)])
    assert nowhere.exit_code == 2 and nowhere.stderr.strip() == (
        f"fedrec: error: {tmp_path / 'record' / RECORD}: no record of answers (is {tmp_path} a "
        "site's --state-dir?)"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--train", "{good}"], "--train and --test go together"),
        (["--rounds", "0"], "rounds (--rounds): Input should be greater than or equal to 1"),
    ],
)
def test_configuration_errors_still_come_from_the_config_in_one_line(tmp_path, args, expected):
    good = tmp_path / "good.csv"
    good.write_text("user_id,item_id,rating\n" + GOOD_ROWS)
    args = [a.replace("{good}", str(good)) for a in args]

    done, _ = _cli(["train", *args], tmp_path / "home")

    _assert_one_line_error(done, expected)
    _assert_nothing_started(tmp_path / "home")


def test_train_help_is_grouped_with_one_default_per_flag():
    import re

    from click.testing import CliRunner

    from fedrec.cli import main
    from fedrec.config_flags import FILE_ONLY, GROUP_ORDER, GROUPS, config_fields

    fields = [f for f in config_fields() if f["name"] not in FILE_ONLY]
    text = CliRunner().invoke(main, ["train", "--help"], terminal_width=2000).output

    assert [f for f in fields if f["name"] not in GROUPS] == []  # no flag falls into a catch-all
    headings = re.findall(r"^(\w+) options:$", text, flags=re.MULTILINE)
    assert headings == [g.capitalize() for g in GROUP_ORDER]
    flag_lines: dict[str, str] = {}  # each option's lines joined (a long flag wraps its help)
    last = None
    for line in text.splitlines():
        if line.startswith("  --"):
            last = line.split()[0]
            flag_lines[last] = line
        elif last and line.startswith("      "):
            flag_lines[last] += " " + line.strip()
        else:
            last = None
    for field in fields:
        flag = "--" + field["name"].replace("_", "-")
        line = flag_lines[flag]
        assert len(re.findall(r"\bdefault\b", line, flags=re.IGNORECASE)) == 1, line
        before = text[: text.index("\n  " + flag + " ")]
        section = before.rsplit(" options:", 1)[0].rsplit("\n", 1)[-1]
        assert section == GROUPS[field["name"]].capitalize(), (flag, section)
    # the default shown is the config field's own, when the help text does not state it
    assert "[default: 10]" in flag_lines["--clients"]
    assert "[default: not set]" in flag_lines["--train"]
    assert "[default: off]" in flag_lines["--secure-aggregation"]
    assert (
        flag_lines["--factors"].count("default") == 1 and "32 explicit" in flag_lines["--factors"]
    )


def test_recommend_without_a_store_says_so_and_creates_no_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    history = tmp_path / "history.csv"
    history.write_text("user_id,item_id,rating\nu1,i1,5\n")
    home = tmp_path / "home"

    done, _ = _cli(["recommend", "--history", str(history)], home)

    _assert_one_line_error(done, f"no MLflow store at {home / 'mlflow.db'}")
    assert not home.exists()


def _sites_file(folder: Path, extra: str = "") -> Path:
    """A sites file of shop-a (and ``extra`` lines), with the coordinator's and shop-a's keys."""
    from models.privacy.identity import generate_identity, write_identity

    for name in ("coordinator", "shop-a"):
        write_identity(generate_identity(), folder, name)
    sites = folder / "sites.yaml"
    sites.write_text(
        f"coordinator_key: {folder}/coordinator.key\nsites:\n"
        f"  - name: shop-a\n    public_key: {folder}/shop-a.pub\n" + extra
    )
    return sites


def test_a_sites_file_that_cannot_be_used_is_refused_before_any_flow_starts(tmp_path):
    sites = _sites_file(tmp_path, f"  - name: shop-b\n    public_key: {tmp_path}/shop-a.pub\n")

    done, imported = _cli(["train", "--sites", str(sites)], tmp_path / "home")

    _assert_one_line_error(done, str(sites), "sites shop-a and shop-b share one public key")
    assert not set(imported) & {"prefect", "mlflow"}, imported
    _assert_nothing_started(tmp_path / "home")


class _Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *_: object) -> None:
        pass


def test_a_secure_sites_run_whose_key_registry_others_could_write_ends_before_any_server(
    tmp_path,
):
    """The run's workspace holds the sites' keys its server steps trust; under a FEDREC_HOME
    every user may write, the command refuses it in one line before it starts or asks for a
    Prefect server (none is set: that refusal would come next)."""
    sites = _sites_file(tmp_path)
    team = tmp_path / "team"
    team.mkdir()
    team.chmod(0o777)
    home = team / "home"
    mlflow = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)  # answers /health
    threading.Thread(target=mlflow.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{mlflow.server_address[1]}"
        args = ["train", "--sites", str(sites), "--secure-aggregation", "--tracking-uri", uri]
        done, _ = _cli(args, home)
    finally:
        mlflow.shutdown()

    lines = done.stderr.strip().splitlines()  # after the progress lines: the error, exit 2
    assert done.returncode == 2 and not [k for k in lines if not k.startswith("fedrec: ")], lines
    assert lines[-1].startswith(
        f"fedrec: error: {home / 'workspaces'}: the run's workspace is reached through {team}, "
        "which every user may write to"
    ) and lines[-1].endswith("(give --workspace DIR in a folder of your own, or use a "
                             "FEDREC_HOME of your own)"), lines  # fmt: skip
    assert list(team.iterdir()) == []


def test_a_sites_run_without_servers_the_sites_can_reach_is_refused_before_any_flow_starts(
    tmp_path,
):
    """Without PREFECT_API_URL a sites run started a local Prefect server no site could be
    connected to, and waited out every site's deadline (600 s by default) before it failed."""
    sites = _sites_file(tmp_path)
    home = tmp_path / "home"
    mlflow = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)  # answers /health
    threading.Thread(target=mlflow.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{mlflow.server_address[1]}"
        no_api, _ = _cli(["train", "--sites", str(sites), "--tracking-uri", uri], home)
    finally:
        mlflow.shutdown()
    local, _ = _cli(["train", "--sites", str(sites)], home)
    # data given with --sites is refused as such, not for a file that is not there
    with_data, _ = _cli(["train", "--sites", str(sites), "--data", str(tmp_path / "no.csv")], home)
    _assert_one_line_error(with_data, "--sites reads no data here and shards none: --data set")

    # after the progress lines of the checks and the flow's imports: the error, exit status 2
    for done, expected in [
        (no_api, "fedrec: error: --sites: no Prefect API is set and no local Prefect server "
                 "runs, so none of the sites can be waiting for this run's requests; allowed: "
                 "PREFECT_API_URL set to the API the sites' `fedrec site run --prefect-api` "
                 "names (`fedrec stores start` prints it)"),
        (local, f"fedrec: error: --sites: the tracking URI sqlite:///{home}/mlflow.db is not "
                "an MLflow server the sites can reach; allowed: --tracking-uri http://HOST:PORT "
                "of an MLflow server with the artifact proxy (`fedrec stores start` prints it)"),
    ]:  # fmt: skip
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and lines[-1] == expected, done.stderr
        assert not [line for line in lines[:-1] if not line.startswith("fedrec: ")], done.stderr
    assert not (home / "server").exists()  # no local Prefect server was started


def test_an_item_list_that_cannot_be_read_is_refused_before_any_flow_starts(tmp_path):
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\n7,a\n,b\n")

    done, imported = _cli(["train", "--dp-epsilon", "8", "--catalogue", str(items)],
                          tmp_path / "home")  # fmt: skip

    _assert_one_line_error(done, str(items), "row 2, column 'item_id': value '' is empty")
    assert not set(imported) & {"prefect", "mlflow"}, imported
    _assert_nothing_started(tmp_path / "home")
    items.write_text("sku,title\n7,a\n")  # without --item-col the column sought is item_id
    done, _ = _cli(["train", "--dp-epsilon", "8", "--catalogue", str(items)], tmp_path / "home")
    _assert_one_line_error(done, str(items), "has no 'item_id' column (found ['sku', 'title'])")


def test_settings_beside_resume_are_refused_rather_than_ignored(tmp_path):
    argv = ["train", "--resume", "0" * 32, "--rounds", "8", "--data", "ml-100k"]

    done, imported = _cli(argv, tmp_path / "home")

    _assert_one_line_error(done, "--resume continues run", "drop --data, --rounds")
    assert not set(imported) & {"prefect", "mlflow"}, imported
    _assert_nothing_started(tmp_path / "home")


def test_prefect_keeps_its_result_files_in_fedrec_home_unless_told_otherwise(tmp_path):
    """A failed flow run writes its result file; without PREFECT_HOME that went to
    ~/.prefect/storage, outside the folder fedrec says holds its state."""
    probe = (
        "from fedrec.cli import _quiet_prefect; _quiet_prefect(False)\n"
        "from prefect.settings import get_current_settings\n"
        "print(get_current_settings().results.local_storage_path)"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}

    def storage(**env: str) -> Path:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              env=clean | {"FEDREC_HOME": str(tmp_path / "home")} | env,
                              timeout=120, check=True)  # fmt: skip
        return Path(done.stdout.strip().splitlines()[-1])

    assert storage() == tmp_path / "home" / "prefect" / "storage"
    # the user's own Prefect settings win
    assert storage(PREFECT_HOME=str(tmp_path / "ph")) == tmp_path / "ph" / "storage"
    assert storage(PREFECT_LOCAL_STORAGE_PATH=str(tmp_path / "s")) == tmp_path / "s"


def test_a_tracking_store_that_cannot_be_used_is_one_line_in_seconds(tmp_path, monkeypatch):
    """MLflow retries an absent server for minutes, and creates a SQLite file (and its folders)
    wherever a mistyped URI points."""
    import time

    from fedrec.local_server import free_port

    absent = f"http://127.0.0.1:{free_port()}"
    history = tmp_path / "history.csv"
    history.write_text("user_id,item_id,rating\nu1,i1,5\n")
    started = time.monotonic()
    trained, imported = _cli(["train", "--tracking-uri", absent], tmp_path / "home")
    asked, _ = _cli(["recommend", "--history", str(history), "--tracking-uri", absent],
                    tmp_path / "home")  # fmt: skip
    assert time.monotonic() - started < 60
    for done in (trained, asked):  # exit 1: the same command may succeed once it answers
        said = f"tracking URI {absent}: the MLflow server does not answer"
        _assert_one_line_error(done, said, status=1)
    assert not set(imported) & {"prefect", "mlflow"}, imported
    _assert_nothing_started(tmp_path / "home")

    typo = tmp_path / "no-such-folder" / "mlflow.db"
    done, _ = _cli(["train", "--tracking-uri", f"sqlite:///{typo}"], tmp_path / "home")
    _assert_one_line_error(done, f"folder {typo.parent} does not exist")
    assert not typo.parent.exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", absent)  # the same store named by the environment
    by_env, _ = _cli(["train"], tmp_path / "home")
    _assert_one_line_error(by_env, f"{absent}: the MLflow server does not answer", status=1)
    _assert_nothing_started(tmp_path / "home")


def test_paths_are_recorded_absolute_so_a_run_means_the_same_files_from_any_folder(tmp_path):
    from fedrec.inputs import absolute_paths

    given = {"data": "shop/ratings.csv", "catalogue": "items.csv", "workspace": "~/ws",
             "model_name": "m", "rounds": 3}  # fmt: skip
    resolved = absolute_paths(given)
    assert resolved["data"] == str(Path.cwd() / "shop" / "ratings.csv")
    assert resolved["catalogue"] == str(Path.cwd() / "items.csv")
    assert resolved["workspace"] == str(Path.home() / "ws")
    assert {k: resolved[k] for k in ("model_name", "rounds")} == {"model_name": "m", "rounds": 3}
    # named datasets stay names (looked up under FEDREC_DATASETS wherever the run resumes)
    assert absolute_paths({"data": "ml-100k"})["data"] == "ml-100k"
    assert absolute_paths({"data": "synthetic"})["data"] == "synthetic"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rounds: two\n", ["run.yaml: rounds: Input should be a valid integer", "(got 'two')"]),
        ('rounds: "3"\n', ["run.yaml: rounds: allowed: a number, not text in quotes (got '3')"]),
        ("seed: true\n", ["run.yaml: seed: allowed: a number, not true/false (got True)"]),
        ("roundz: 3\n", ["run.yaml: roundz: Extra inputs are not permitted; did you mean 'rounds'?"]),
        ("rounds: 2\nrounds: 3\n", ["run.yaml, line 2, column 1: not valid YAML (key 'rounds' appears twice)"]),
        ("rounds: [2\n", ["run.yaml, line 2, column 1: not valid YAML (expected ',' or ']'"]),
        ("rating_scale: [5, 1]\n", ["run.yaml: rating_scale: rating_scale (5, 1) is not a valid range",
                                    "allowed: LOW,HIGH, finite, with LOW < HIGH"]),
    ],
)  # fmt: skip
def test_a_config_file_error_names_the_file_its_line_and_the_key(tmp_path, text, expected):
    config = tmp_path / "run.yaml"
    config.write_text(text)

    done, _ = _cli(["train", "--config", str(config)], tmp_path / "home")

    _assert_one_line_error(done, *[str(tmp_path / part) if i == 0 else part
                                   for i, part in enumerate(expected)])  # fmt: skip
    _assert_nothing_started(tmp_path / "home")


def test_a_misspelt_key_of_a_config_file_is_named_before_the_data_is_read(tmp_path):
    """``usr_col`` left the default user column in force: the data check ran first and blamed
    the data file, which is fine, for a missing 'user_id' column."""
    config, data = tmp_path / "run.yaml", tmp_path / "ratings.csv"
    data.write_text("customer,product,stars\n" + "".join(f"c{u},p{i},4\n" for u in range(4)
                                                        for i in range(3)))  # fmt: skip
    config.write_text(f"data: {data}\nusr_col: customer\nitem_col: product\nrating_col: stars\n")

    done, _ = _cli(["train", "--config", str(config)], tmp_path / "home")

    _assert_one_line_error(
        done, f"invalid configuration: {config}: usr_col: Extra inputs are not permitted; "
        "did you mean 'user_col'? (got 'customer')"
    )  # fmt: skip
    _assert_nothing_started(tmp_path / "home")


@pytest.mark.parametrize(
    ("text", "invalid", "expected"),
    [
        # out of the setting's own bounds: the configuration's check speaks, not the data's
        ("clients: 0\n", True, "clients: Input should be greater than or equal to 1 (got 0)"),
        ("clients: 100\n", False, "setting 'clients': value 100 is more clients than the data has users (4)"),
        # beside a problem of settings together, which the configuration reports only after
        # the data's: the data's problem is the one named
        ("clients: 100\ndp_budget: 1\n", False, "setting 'clients': value 100 is more clients than the data has users (4)"),
        ("rating_scale: [5, 1]\n", True, "rating_scale: rating_scale (5, 1) is not a valid range"),
    ],
)  # fmt: skip
def test_a_config_files_setting_the_data_refuses_is_named_with_its_file(
    tmp_path, text, invalid, expected
):
    """Settings the data files are checked against (before the configuration's own checks)
    named the data file or nothing, not the --config file the value came from."""
    config, data = tmp_path / "run.yaml", tmp_path / "ratings.csv"
    config.write_text(text)
    data.write_text("user_id,item_id,rating\n" + "".join(f"{u},{i},4\n" for u in range(4)
                                                           for i in range(3)))  # fmt: skip

    done, _ = _cli(["train", "--config", str(config), "--data", str(data)], tmp_path / "home")

    line = _assert_one_line_error(done, expected)
    prefix = "invalid configuration: " if invalid else ""
    assert line.startswith(f"fedrec: error: {prefix}{config}: "), line
    _assert_nothing_started(tmp_path / "home")


def test_a_config_files_relative_paths_are_the_files_folders_and_a_flags_the_current_ones(
    tmp_path, monkeypatch
):
    """A scheduler runs `fedrec train --config /etc/fedrec/run.yaml` from another folder."""
    from fedrec.cli import config_values

    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "ml-1m").mkdir()  # a folder of that name beside the file: the path, not the dataset
    config = folder / "run.yaml"
    config.write_text(
        "data: ratings.csv\ncatalogue: ../items.csv\nworkspace: ws\ntest: ml-100k\n"
        f"valid: {tmp_path / 'abs.csv'}\ntrain: ml-1m\n"
    )
    monkeypatch.chdir(tmp_path)

    values, from_file = config_values(str(config.relative_to(tmp_path)), {"sites": None})
    assert values == {
        "data": str(folder / "ratings.csv"),
        "catalogue": str(tmp_path / "items.csv"),
        "workspace": str(folder / "ws"),
        "test": "ml-100k",  # a named dataset: nothing of that name beside the file
        "valid": str(tmp_path / "abs.csv"),
        "train": str(folder / "ml-1m"),
    }
    assert from_file == set(values)
    flagged, _ = config_values(str(config), {"data": "other.csv", "workspace": "mine"})
    assert (flagged["data"], flagged["workspace"]) == ("other.csv", "mine")  # made absolute later
    assert config_values(None, {"data": "synthetic"})[0] == {"data": "synthetic"}


def test_a_users_or_pairs_file_is_refused_in_the_readers_words(tmp_path):
    from fedrec.cli_models import _read_ids
    from models.data.errors import DataValidationError

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("user_id,item\nu1,i1\n")
    names = {"user_id": "user_id", "item_id": "item_id"}

    with pytest.raises(DataValidationError) as missing:
        _read_ids(str(tmp_path / "none.csv"), names)
    with pytest.raises(DataValidationError) as column:
        _read_ids(str(pairs), names)

    assert str(missing.value) == (
        f"{tmp_path / 'none.csv'}: no such file; allowed: a CSV file with column(s) user_id, item_id"
    )
    assert str(column.value) == (
        f"{pairs}, column 'item_id': column not found (did you mean 'item'?); allowed: one of the "
        "columns present: 'user_id', 'item'"
    )


def test_an_out_that_is_an_input_is_refused_before_the_model_loads(tmp_path):
    """Writing the answer over --history, --users or --pairs would destroy the input."""
    history = tmp_path / "history.csv"
    history.write_text("user_id,item_id,rating\nu1,i1,5\n")
    before = history.read_text()
    home = tmp_path / "home"  # no store: the model would be refused second

    asked, imported = _cli(
        ["predict", "--history", str(history), "--pairs", str(history), "--out",
         str(tmp_path / "." / "history.csv")], home,
    )  # fmt: skip

    _assert_one_line_error(
        asked, "--out ", "is the same file as --history", "allowed: another file"
    )
    assert history.read_text() == before
    assert not set(imported) & {"mlflow", "prefect"}, imported


def test_an_out_that_cannot_be_written_is_refused_in_one_line(tmp_path):
    from fedrec.cli_errors import UserError
    from fedrec.cli_models import _check_out

    users = tmp_path / "users.csv"
    users.write_text("user_id\nu1\n")
    (tmp_path / "link.csv").symlink_to(users)
    inputs = {"--history": str(tmp_path / "h.csv"), "--users": str(users)}
    cases = {
        str(tmp_path): "is a folder; allowed: a file path",
        str(tmp_path / "link.csv"): f"is the same file as --users {users}",
        str(tmp_path / "no" / "r.csv"): f"no such folder {tmp_path / 'no'}",
    }
    if Path("/sys/kernel").is_dir():  # Linux: writable to os.access as root, yet not
        cases["/sys/fedrec-out.csv"] = "cannot be written (Permission denied)"  # the OS's words
    for out, expected in cases.items():
        with pytest.raises(UserError) as refused:
            _check_out(out, inputs)
        assert str(refused.value).startswith(f"--out {out}: "), refused.value
        assert expected in str(refused.value), refused.value
    _check_out(str(tmp_path / "recs.csv"), inputs)  # a new file in a writable folder
    _check_out(None, inputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "users.csv"]


def test_a_tracking_uri_without_a_scheme_is_refused_before_any_server_starts(tmp_path):
    """MLflow reads a bare path as its file store and refuses it with a page of text; train
    would have started the local Prefect server first."""
    db = tmp_path / "mlflow.db"
    trained, imported = _cli(["train", "--tracking-uri", str(db)], tmp_path / "home")

    _assert_one_line_error(
        trained, f"--tracking-uri {db}: not a tracking URI; allowed: sqlite:///PATH",
        f"(a SQLite file: sqlite:///{db})",
    )  # fmt: skip
    assert not set(imported) & {"prefect", "mlflow"}, imported
    _assert_nothing_started(tmp_path / "home")


def test_check_tracking_uri_names_the_uri_its_source_and_the_stores_allowed(monkeypatch):
    from fedrec.model_store import TrackingStoreError, check_tracking_uri, tracking_uri_source

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri, expected in {
        "garbage": "--tracking-uri garbage: not a tracking URI; allowed: sqlite:///PATH, "
        "http(s)://HOST[:PORT], postgresql://USER@HOST/DB, mysql://USER@HOST/DB",
        "localhost:5000": "not a tracking URI",
        "file:///tmp/mlruns": "MLflow's file store is not supported",
    }.items():
        with pytest.raises(TrackingStoreError) as refused:
            check_tracking_uri(uri, name="--tracking-uri")
        assert str(refused.value).startswith(f"--tracking-uri {uri}: "), refused.value
        assert expected in str(refused.value), refused.value
    for uri in ("sqlite:///:memory:", "postgresql+psycopg2://u@db/mlflow", "databricks://p",
                "databricks", "databricks-uc://p"):  # fmt: skip
        check_tracking_uri(uri)  # a scheme MLflow or a plugin reads: its own checks apply
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking_uri("file:///tmp/mlruns")  # MLflow reads its file store when told to

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "x")
    assert tracking_uri_source("sqlite:///a.db") == "--tracking-uri"
    assert tracking_uri_source(None) == "MLFLOW_TRACKING_URI"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri_source(None) == "tracking URI"


def test_a_users_or_pairs_file_is_read_as_the_history_is(tmp_path):
    """Semicolons and tabs as delimiters, spaces around the header's names."""
    from fedrec.cli_models import _read_ids

    names = {"user_id": "user_id", "item_id": "item_id"}
    for name, text in {
        "spaces.csv": "user_id, item_id\nu1, i1\nNA,i2\n",
        "semicolons.csv": "user_id;item_id\nu1;i1\nNA;i2\n",
        "tabs.tsv": "user_id\titem_id\nu1\ti1\n\nNA\ti2\n",
    }.items():
        (tmp_path / name).write_text(text)
        frame = _read_ids(str(tmp_path / name), names)
        assert frame[["user_id", "item_id"]].values.tolist() == [["u1", "i1"], ["NA", "i2"]], name


def test_a_users_files_invalid_age_or_gender_is_refused_at_its_row(tmp_path):
    """A ranking model would read it as unknown without a word; an empty cell stays unknown."""
    from fedrec.cli_models import _read_users
    from models.data.errors import DataValidationError

    columns = {"user_col": "user_id", "item_col": "item_id", "rating_col": "rating"}
    users = tmp_path / "users.csv"
    users.write_text("user_id,age,gender\nu1,31,m\nu2,,\nu3,NA, \n")
    kept = _read_users(str(users), columns)
    assert kept["age"].tolist()[0] == 31 and kept["gender"].tolist()[0] == "m"
    assert kept["age"].isna().tolist() == [False, True, True]
    for text, expected in {
        "user_id,age\nu1,30\nu2,twenty-five\n": "row 2 (line 3), column 'age': value "
        "'twenty-five' is not a valid age; allowed: a number of years in [0, 150], or an empty "
        "cell (unknown)",
        "user_id;age\nu1;-400\n": "row 1 (line 2), column 'age': value '-400' is not a valid "
        "age; allowed: a number of years in [0, 150], or an empty cell (unknown)",
        "user_id,gender\nu1,F\n\nu2,male\n": "row 2 (line 4), column 'gender': value 'male' is "
        "not a valid gender; allowed: M or F (either case), or an empty cell (unknown)",
        "user_id,gender\nu1,Q\n": "row 1 (line 2), column 'gender': value 'Q' is not a valid "
        "gender; allowed: M or F (either case), or an empty cell (unknown)",
    }.items():
        users.write_text(text)
        with pytest.raises(DataValidationError) as refused:
            _read_users(str(users), columns)
        assert str(refused.value) == f"{users}, {expected}", refused.value

    # through the command: one line, exit 2, before the model is loaded (there is no store)
    history = tmp_path / "history.csv"
    history.write_text("user_id,item_id\nu1,i1\n")
    users.write_text("user_id,gender\nu1,Q\n")
    asked, imported = _cli(
        ["recommend", "--history", str(history), "--users", str(users)], tmp_path / "home"
    )
    _assert_one_line_error(asked, f"{users}, row 1 (line 2), column 'gender': value 'Q'")
    assert not set(imported) & {"mlflow", "prefect"}, imported
