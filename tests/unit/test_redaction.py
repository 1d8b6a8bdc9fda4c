"""Credentials never reach a log: the URI redaction and the configuration as it is logged."""

from __future__ import annotations

import json

import pytest

from fedrec.config import TrainingConfig
from models.privacy.redaction import redact_uri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
        ("postgresql+psycopg2://u:p%40ss@db.example:5432/mlflow",
         "postgresql+psycopg2://u:***@db.example:5432/mlflow"),
        ("https://alice:hunter2@mlflow.example/api", "https://alice:***@mlflow.example/api"),
        ("https://mlflow.example/?token=abc123&x=1", "https://mlflow.example/?token=***&x=1"),
        ("mysql://u@h/db?password=pw&ssl=true", "mysql://u@h/db?password=***&ssl=true"),
        ("s3://bucket/p?X-Amz-Signature=deadbeef&X-Amz-Date=1",
         "s3://bucket/p?X-Amz-Signature=***&X-Amz-Date=1"),
        ("postgresql://user:a@b@host/db", "postgresql://user:***@host/db"),  # unencoded @
    ],
)  # fmt: skip
def test_passwords_and_secret_query_values_are_masked(uri, expected):
    assert redact_uri(uri) == expected


@pytest.mark.parametrize(
    "uri",
    ["sqlite:////tmp/fedrec/mlflow.db", "http://127.0.0.1:5000", "ratings.csv", "ml-1m",
     "postgresql://user@host/db", "tcp://10.0.0.1:8786", "https://h/p?user=bob&page=2"],
)  # fmt: skip
def test_uris_without_credentials_come_back_unchanged(uri):
    assert redact_uri(uri) == uri


def test_a_malformed_uri_still_loses_its_password():
    assert redact_uri("postgresql://u:pw@[::1/db") == "postgresql://u:***@[::1/db"


def test_the_logged_configuration_masks_the_tracking_uri_everywhere():
    uri = "postgresql://fedrec:s3cret-pw@db.example/mlflow?sslpassword=also-secret"
    config = TrainingConfig(tracking_uri=uri, dask_address="tcp://u:daskpw@sched:8786",
                            task_runner="dask")  # fmt: skip

    logged = [
        json.dumps(config.flat_params()),  # the MLflow params
        config.redacted().model_dump_json(),  # the fedrec.config tag and config.json
    ]

    for text in logged:
        assert "s3cret-pw" not in text and "also-secret" not in text and "daskpw" not in text
        assert "postgresql://fedrec:***@db.example/mlflow?sslpassword=***" in text
    assert config.tracking_uri == uri  # the run itself still connects with the real URI
    assert config.redacted().config_hash() == config.config_hash()
    plain = TrainingConfig()
    assert plain.redacted() is plain


def test_a_failed_runs_error_tag_names_the_error_without_its_credentials():
    from tasks.tracking import failure

    err = OSError("tracking URI postgresql://fedrec:s3cret@db/mlflow: no answer\nTraceback ...")
    line = failure(err)
    assert line == "OSError: tracking URI postgresql://fedrec:***@db/mlflow: no answer"
    assert failure(ValueError("x" * 900)).startswith("ValueError: xxx")
    assert len(failure(ValueError("x" * 900))) == 500
    assert failure(KeyboardInterrupt()) == "interrupted (Ctrl-C)"
    # a private run's message may quote a row: MLflow's readers get the type alone
    quoting = ValueError("ratings.csv, row 7, column 'user_id': value 'alice' ...")
    assert "alice" not in failure(quoting, private=True)
    assert failure(quoting, private=True).startswith("ValueError (a private run")
