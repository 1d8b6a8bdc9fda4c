"""A training run's MLflow params are its whole configuration, within MLflow's limits of 100
params per request and 6000 characters per value; its model version's metrics tag is JSON within
the limit of a tag value."""

from __future__ import annotations

import json

from mlflow import MlflowClient

from fedrec.config import TrainingConfig
from tasks.tracking import start_run


def test_every_setting_is_a_param_however_many_and_long_they_are(tmp_path, monkeypatch):
    settings = {f"setting_{i:03d}": str(i) for i in range(230)} | {"long": "x" * 7000}
    monkeypatch.setattr(TrainingConfig, "flat_params", lambda self: settings)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    _, run_id = start_run.fn(TrainingConfig(tracking_uri=uri), "fingerprint", None)

    logged = MlflowClient(tracking_uri=uri).get_run(run_id).data.params
    assert logged == settings | {"long": "x" * 6000}  # MLflow's longest value


def test_a_sites_run_is_named_after_the_sites_that_enrolled(tmp_path):
    """``als-k32-3c-10r``: three of the configured clients (sites) took part."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    by_key = {"clients": None, "partition": "by-key", "partition_key": "region"}
    for fields in ({}, by_key):  # 10 clients configured, or one per region
        config = TrainingConfig(tracking_uri=uri, factors=32, **fields)
        _, run_id = start_run.fn(config, "fingerprint", None, clients=3)
        assert client.get_run(run_id).info.run_name == "als-k32-3c-10r"


def test_the_code_version_is_the_commit_of_the_checkout_that_trained():
    """``fedrec.code_version``: the checkout's commit (``-dirty`` with changes to tracked files),
    or the installed package's version where the code is not a git checkout."""
    import subprocess
    from importlib.metadata import version
    from pathlib import Path

    from tasks.tracking import code_version

    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)

    inside = git("rev-parse", "--show-toplevel")
    if inside.returncode != 0 or Path(inside.stdout.strip()).resolve() != root:
        assert code_version() == f"fedrec-{version('fedrec')}"  # an unpacked tree, not a clone
        return
    sha = git("rev-parse", "--short=12", "HEAD").stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    assert code_version() == sha + ("-dirty" if dirty else "")


def test_the_metrics_tag_is_json_that_fits_the_last_metrics_left_out_whole():
    from tasks.tracking import METRICS_TAG_LIMIT, version_tags

    metrics = {f"test/client_p{i:03d}/ndcg_at_1000": 0.123456789 + i for i in range(200)}
    promotion = "test/client_p000/ndcg_at_1000"
    text = version_tags(metrics, {"fedrec.x": "y"}, promotion)["fedrec.metrics_json"]

    assert len(text) <= METRICS_TAG_LIMIT
    kept = json.loads(text)  # a cut at a character would not parse
    rounded = [(k, round(v, 6)) for k, v in metrics.items()]
    assert list(kept.items()) == rounded[: len(kept)]  # the first ones, in order
    assert len(json.dumps(dict(rounded[: len(kept) + 1]))) > METRICS_TAG_LIMIT  # all that fit
    few = dict(list(metrics.items())[:3])
    assert json.loads(version_tags(few, {}, promotion)["fedrec.metrics_json"]) == dict(rounded[:3])
    # at the edge: '{"' + name + '": 0.5}' is 5000 characters (an older server's limit), then 5001
    assert (
        version_tags({"m" * 4991: 0.5}, {}, "m")["fedrec.metrics_json"]
        == f'{{"{"m" * 4991}": 0.5}}'
    )
    assert version_tags({"m" * 4992: 0.5}, {}, "m")["fedrec.metrics_json"] == "{}"
