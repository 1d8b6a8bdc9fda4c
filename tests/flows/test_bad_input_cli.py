"""A corpus of malformed inputs through the `fedrec` command line. Each must exit with status 2
and one error line on stderr naming what is wrong and where (no traceback without --debug; only
fedrec's progress notes before it, when the flow is the one to find the problem), and leave the
registry as it was: no new model version, the champion unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from fedrec.cli import main

GOOD = "user_id,item_id,rating\n" + "".join(
    f"u{u},i{(u * 7 + j) % 40},{1 + (u + j) % 5}\n" for u in range(60) for j in range(12)
)
MODEL = "corpus"

# (id, files to write {name: text or bytes}, command, text the error line must contain)
CASES = [
    ("missing-data-file", {}, ["train", "--data", "{tmp}/nope.csv"], "data='{tmp}/nope.csv': no such file or folder"),
    ("named-dataset-typo", {}, ["train", "--data", "ml100k"], "did you mean 'ml-100k'? named datasets: synthetic, ml-100k, ml-1m"),
    ("empty-file", {"r.csv": b""}, ["train", "--data", "{tmp}/r.csv"], "is empty (0 bytes)"),
    ("header-only", {"r.csv": "user_id,item_id,rating\n"}, ["train", "--data", "{tmp}/r.csv"], "has no data rows"),
    ("unsupported-extension", {"r.xlsx": GOOD}, ["train", "--data", "{tmp}/r.xlsx"], "unsupported file type '.xlsx'"),
    ("not-utf8", {"r.csv": ("user_id,item_id,rating\nu1,Mis\xe9rables,3\n").encode("latin-1")},
     ["train", "--data", "{tmp}/r.csv"], "is not valid UTF-8"),
    ("missing-item-column", {"r.csv": "user_id,movie,rating\nu1,m1,3\n"}, ["train", "--data", "{tmp}/r.csv"], "item_id"),
    ("rating-out-of-scale", {"r.csv": GOOD + "u1,i1,9\n"}, ["train", "--data", "{tmp}/r.csv"], "outside the rating scale"),
    ("rating-not-a-number", {"r.csv": GOOD + "u1,i1,great\n"}, ["train", "--data", "{tmp}/r.csv"], "'great'"),
    ("empty-user-id", {"r.csv": GOOD + ",i1,3\n"}, ["train", "--data", "{tmp}/r.csv"], "user_id"),
    ("garbage-parquet", {"r.parquet": b"PAR1 not really"}, ["train", "--data", "{tmp}/r.parquet"], "r.parquet"),
    ("not-a-movielens-folder", {"ml/readme.txt": "hello"}, ["train", "--data", "{tmp}/ml"], "{tmp}/ml"),
    ("bad-test-file", {"tr.csv": GOOD, "te.csv": "user_id,item_id,rating\nu1,i1,0\n"},
     ["train", "--train", "{tmp}/tr.csv", "--test", "{tmp}/te.csv"], "te.csv"),
    ("train-without-test", {"tr.csv": GOOD}, ["train", "--train", "{tmp}/tr.csv"], "--train and --test go together"),
    ("yaml-unknown-key", {"c.yaml": "rounds: 2\nfactorz: 3\n"}, ["train", "--config", "{tmp}/c.yaml"], "factorz: Extra inputs are not permitted"),
    ("yaml-syntax", {"c.yaml": "rounds: [2\n"}, ["train", "--config", "{tmp}/c.yaml"], "c.yaml"),
    ("yaml-wrong-type", {"c.yaml": "rounds: many\n"}, ["train", "--config", "{tmp}/c.yaml"], "rounds"),
    ("config-file-missing", {}, ["train", "--config", "{tmp}/none.yaml"], "none.yaml"),
    ("rounds-negative", {}, ["train", "--rounds", "-1"], "rounds (--rounds): Input should be greater than or equal to 1"),
    ("clients-zero", {}, ["train", "--clients", "0"], "clients (--clients): Input should be greater than or equal to 1"),
    ("fraction-above-one", {}, ["train", "--client-fraction", "2"], "client_fraction (--client-fraction): Input should be less than or equal to 1"),
    ("unknown-algorithm", {}, ["train", "--algorithm", "svd"], "'svd' is not one of"),
    ("ranker-without-implicit", {}, ["train", "--ranker", "lightgbm"], "ranker='lightgbm' needs feedback='implicit'"),
    ("by-key-without-key", {}, ["train", "--partition", "by-key"], "--partition by-key needs --partition-key"),
    ("rmse-promotion-for-implicit", {}, ["train", "--feedback", "implicit", "--promotion-metric", "valid/rmse"], "has no rating error"),
    ("attack-on-als", {}, ["train", "--attack", "sign_flip", "--attack-fraction", "0.2"], "robust rules and attacks apply to fedavg"),
    ("quorum-above-clients", {}, ["train", "--clients", "2", "--min-clients", "3"], "min_clients=3 exceeds clients=2"),
    ("per-user-fedavg", {}, ["train", "--partition", "per-user", "--algorithm", "fedavg"], "--partition per-user trains ALS"),
    ("dask-address-without-dask", {}, ["train", "--dask-address", "tcp://127.0.0.1:8786"], "--dask-address needs --task-runner dask"),
    ("dp-with-ranker", {}, ["train", "--feedback", "implicit", "--ranker", "lightgbm", "--dp-epsilon", "4"], "differential privacy covers implicit ALS only"),
    ("explicit-without-ratings", {"r.csv": "user_id,item_id\n" + "".join(f"u{u},i{u % 9}\n" for u in range(60))},
     ["train", "--data", "{tmp}/r.csv"], "r.csv, column 'rating': has no ratings: every row would count as the same rating"),
    ("rating-scale-not-a-pair", {"r.csv": GOOD}, ["train", "--data", "{tmp}/r.csv", "--rating-scale", "1-5"], "rating_scale='1-5': expected LOW,HIGH"),
    ("rating-off-scale", {"r.csv": GOOD.replace(",5\n", ",9\n", 1)}, ["train", "--data", "{tmp}/r.csv"],
     "value 9.0 is outside the rating scale; allowed: a number in [1.0, 5.0] (rating_scale); --rating-scale LOW,HIGH sets the scale, --rating-scale data takes the data's"),
    ("clients-above-users", {"r.csv": GOOD}, ["train", "--data", "{tmp}/r.csv", "--clients", "500"],
     "{tmp}/r.csv, setting 'clients': value 500 is more clients than the data has users (60); allowed: 1..60"),
    ("positive-threshold-above-every-rating", {"r.csv": GOOD},
     ["train", "--data", "{tmp}/r.csv", "--feedback", "implicit", "--positive-threshold", "9", "--clients", "2"],
     "{tmp}/r.csv, setting 'positive_threshold': value 9.0 keeps no row as a positive (the highest rating is 5)"),
    ("unknown-model-name", {"h.csv": GOOD}, ["recommend", "--model", "models:/nope@champion", "--history", "{tmp}/h.csv"], "nope"),
    ("unknown-model-version", {"h.csv": GOOD}, ["recommend", "--model", f"models:/{MODEL}/999", "--history", "{tmp}/h.csv"], "999"),
    ("unknown-run", {"h.csv": GOOD}, ["recommend", "--model", "runs:/0123456789abcdef/model", "--history", "{tmp}/h.csv"], "0123456789abcdef"),
    ("malformed-model-uri", {"h.csv": GOOD}, ["recommend", "--model", "champion-please", "--history", "{tmp}/h.csv"], "champion-please"),
    ("history-missing", {}, ["recommend", "--model", f"models:/{MODEL}@champion", "--history", "{tmp}/h.csv"], "h.csv"),
    ("history-without-ratings", {"h.csv": "user_id,item_id\nu1,i1\n"}, ["recommend", "--model", f"models:/{MODEL}@champion", "--history", "{tmp}/h.csv"],
     "h.csv: no rating column 'rating': this model predicts ratings from the user's own; allowed: ratings in [1, 5]"),
    ("history-rating-off-scale", {"h.csv": "user_id,item_id,rating\nu1,i1,9\n"}, ["predict", "--model", f"models:/{MODEL}@champion", "--history", "{tmp}/h.csv", "--pairs", "{tmp}/h.csv"],
     "h.csv, row 1 (line 2), column 'rating': value 9.0 is outside the rating scale; allowed: a number in [1.0, 5.0]"),
    ("out-folder-missing", {"h.csv": GOOD}, ["recommend", "--model", f"models:/{MODEL}@champion", "--history", "{tmp}/h.csv", "--out", "{tmp}/no/recs.csv"],
     "--out {tmp}/no/recs.csv: no such folder {tmp}/no"),
    ("out-is-the-history", {"h.csv": GOOD}, ["recommend", "--model", f"models:/{MODEL}@champion", "--history", "{tmp}/h.csv", "--out", "{tmp}/h.csv"],
     "--out {tmp}/h.csv: is the same file as --history {tmp}/h.csv, which writing would overwrite; allowed: another file"),
    ("out-is-the-pairs", {"h.csv": GOOD, "p.csv": "user_id,item_id\nu1,i1\n"},
     ["predict", "--model", f"models:/{MODEL}@champion", "--history", "{tmp}/h.csv", "--pairs", "{tmp}/p.csv", "--out", "{tmp}/p.csv"],
     "--out {tmp}/p.csv: is the same file as --pairs {tmp}/p.csv"),
    ("out-is-a-folder", {"h.csv": GOOD}, ["recommend", "--model", f"models:/{MODEL}@champion", "--history", "{tmp}/h.csv", "--out", "{tmp}"],
     "--out {tmp}: is a folder; allowed: a file path"),
    ("users-age-not-a-number", {"h.csv": GOOD, "u.csv": "user_id,age\nu1,twenty-five\n"},
     ["recommend", "--model", f"models:/{MODEL}@champion", "--history", "{tmp}/h.csv", "--users", "{tmp}/u.csv"],
     "{tmp}/u.csv, row 1 (line 2), column 'age': value 'twenty-five' is not a valid age; allowed: a number of years in [0, 150]"),
    ("users-header-only", {"h.csv": GOOD, "u.csv": "user_id\n"},
     ["recommend", "--model", f"models:/{MODEL}@champion", "--history", "{tmp}/h.csv", "--users", "{tmp}/u.csv"],
     "{tmp}/u.csv: has no data rows; allowed: at least one row of user_id"),
    ("pairs-header-only", {"h.csv": GOOD, "p.csv": "user_id,item_id\n"},
     ["predict", "--model", f"models:/{MODEL}@champion", "--history", "{tmp}/h.csv", "--pairs", "{tmp}/p.csv"],
     "{tmp}/p.csv: has no data rows; allowed: at least one row of user_id, item_id"),
    ("tracking-uri-without-scheme", {"h.csv": GOOD}, ["recommend", "--history", "{tmp}/h.csv", "--tracking-uri", "{tmp}/mlflow.db"],
     "--tracking-uri {tmp}/mlflow.db: not a tracking URI; allowed: sqlite:///PATH"),
    ("pairs-without-item-column", {"h.csv": GOOD, "p.csv": "user_id,thing\nu1,i1\n"},
     ["predict", "--model", f"models:/{MODEL}@champion", "--history", "{tmp}/h.csv", "--pairs", "{tmp}/p.csv"], "item_id"),
    ("serve-cron-not-a-schedule", {}, ["serve", "--cron", "notacron"],
     "--cron 'notacron': not a cron schedule; allowed: five fields"),
    ("pairs-row-without-item", {"h.csv": GOOD, "p.csv": "user_id,item_id\nu1,i1\nu2,\n"},
     ["predict", "--model", f"models:/{MODEL}@champion", "--history", "{tmp}/h.csv", "--pairs", "{tmp}/p.csv"],
     "{tmp}/p.csv, row 2 (line 3), column 'item_id': missing id; allowed: an id in every row of user_id, item_id"),
    ("column-named-twice", {"r.csv": "user_id,item_id,rating,rating\nu1,i1,3,9\nu2,i2,4,9\n"},
     ["train", "--data", "{tmp}/r.csv", "--clients", "2"],
     "{tmp}/r.csv, column 'rating': is named 2 times in the header; allowed: each column named once"),
]  # fmt: skip


@pytest.fixture(scope="module")
def registry(tmp_path_factory, prefect_server):
    """A store whose model already has a champion, so every case can check it is left alone."""
    home = tmp_path_factory.mktemp("fedrec-corpus")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDREC_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        trained = CliRunner().invoke(main, ["train", "--rounds", "1", "--clients", "2", "--factors", "2",
                                            "--model-name", MODEL, "--json"], catch_exceptions=False)  # fmt: skip
        assert trained.exit_code == 0, trained.stderr
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.parametrize(
    ("files", "command", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_gives_one_line_exit_2_and_leaves_the_registry_alone(
    registry, tmp_path, files, command, expected
):
    for name, content in files.items():
        path = Path(tmp_path, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    if args[0] == "train":
        args += (
            ["--model-name", MODEL, "--rounds", "1"]
            if "--rounds" not in args and "--config" not in args
            else ["--model-name", MODEL]
        )
    versions_before = len(registry.search_model_versions(f"name='{MODEL}'"))
    champion_before = registry.get_model_version_by_alias(MODEL, "champion").version

    result = CliRunner().invoke(main, args)

    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr[-2000:])
    # one error line, last; before it only fedrec's progress notes, for a problem the flow finds
    # (the users a file holds are counted once it is read whole)
    errors = [line for line in lines if line.startswith("fedrec: error: ")]
    assert errors == lines[-1:], result.stderr[-2000:]
    assert all(line.startswith("fedrec: ") for line in lines), result.stderr[-2000:]
    assert expected.replace("{tmp}", str(tmp_path)) in lines[-1], lines[-1]
    assert "Traceback" not in result.output + result.stderr
    assert len(registry.search_model_versions(f"name='{MODEL}'")) == versions_before
    assert registry.get_model_version_by_alias(MODEL, "champion").version == champion_before
