"""`fedrec train --sites`: what the configuration refuses, in one line each."""

import pytest
from pydantic import ValidationError

from fedrec.config import TrainingConfig


@pytest.fixture(autouse=True)
def _sites_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sites.yaml").write_text("sites: []\n")


def test_sites_train_the_explicit_family_under_secure_aggregation_with_its_quorum():
    config = TrainingConfig(sites="sites.yaml", secure_aggregation=True)
    assert config.min_clients == 2  # the fewest sites whose sums secure aggregation can open


def test_sites_need_no_clients_and_no_data():
    config = TrainingConfig(sites="sites.yaml", clients=None)
    assert config.clients is None and config.data == "synthetic"  # neither is read with sites


def test_a_sites_run_logs_no_simulated_data_settings():
    params = TrainingConfig(sites="sites.yaml").flat_params()
    assert params["sites"] == "sites.yaml" and "rounds" in params
    assert not {"data", "clients", "partition", "synthetic_users"} & set(params)
    assert {"data", "clients"} <= set(TrainingConfig().flat_params())  # a simulated run's


def test_a_missing_sites_file_is_refused_before_anything_starts():
    with pytest.raises(ValidationError, match=r"--sites nosuch\.yaml: no such file"):
        TrainingConfig(sites="nosuch.yaml")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (
            {
                "secure_aggregation": True,
                "min_clients": 2,
                "feedback": "implicit",
                "implicit_model": "neural",
            },
            "--secure-aggregation trains the explicit family",
        ),
        ({"feedback": "implicit"}, "the two-stage family runs in simulation only"),
        ({"partition": "per-user"}, "per-user"),
        ({"fault_probability": 0.5}, "fault simulation"),
        ({"task_runner": "dask"}, "--sites with --task-runner dask: the exchanges with the sites"),
        (
            {"data": "ml-100k", "clients": 5, "partition": "dirichlet"},
            r"--sites reads no data here and shards none: --data, --clients, --partition set a",
        ),
        (
            {"feedback": "implicit", "implicit_model": "neural", "repeats": "sum"},
            r"--sites reads no data here and shards none: --repeats set a",
        ),
    ],
)
def test_what_sites_cannot_do_yet_is_refused_in_one_line(changes, reason):
    with pytest.raises(ValidationError, match=reason):
        TrainingConfig(sites="sites.yaml", **changes)


class _Enrolled(Exception):
    """The run went on to its sites' enrolment."""


def _enrolment(config: TrainingConfig):
    raise _Enrolled


@pytest.mark.parametrize("where", ["workspace", "home"])
def test_a_secure_sites_run_refuses_a_key_registry_others_could_write_before_its_sites_enrol(
    tmp_path, monkeypatch, where
):
    """A sites run's workspace holds the sites' keys its server steps trust: whoever can write a
    folder on its way could register a key of their own for a site. The flow refuses such a
    workspace before any site is asked to enrol (a deployment's run takes this path)."""
    from flows import training
    from models.files import UnsafeFile

    team = tmp_path / "team"
    team.mkdir()
    team.chmod(0o777)
    monkeypatch.setenv("FEDREC_HOME", str(team / "home"))
    monkeypatch.setattr(training, "start_sites_run", _enrolment)
    workspace = {"workspace": str(team / "ws")} if where == "workspace" else {}
    expected = team / "ws" if where == "workspace" else team / "home" / "workspaces"
    config = TrainingConfig(sites="sites.yaml", secure_aggregation=True, **workspace)
    with pytest.raises(UnsafeFile, match=rf"^{expected}: the run's workspace is reached through "
                       rf"{team}, which every user may write to"):  # fmt: skip
        training._train(config)
    assert list(team.iterdir()) == []


def test_a_sites_run_without_secure_aggregation_keeps_nothing_private_in_its_workspace(
    tmp_path, monkeypatch
):
    """Its sites keep their answers and count their own users' budgets: neither the workspace's
    folders nor the coordinator's ledger secret stop it."""
    from flows import training
    from models.privacy.ledger import BudgetError

    team = tmp_path / "team"
    team.mkdir()
    team.chmod(0o777)
    monkeypatch.setenv("FEDREC_HOME", str(team / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # fedrec's own store, whose secret
    monkeypatch.setattr(training, "start_sites_run", _enrolment)  # lies under FEDREC_HOME
    for private in ({}, {"dp_epsilon": 8.0}):
        with pytest.raises(_Enrolled):
            training._train(TrainingConfig(sites="sites.yaml", **private))
    simulated = TrainingConfig(dp_epsilon=8.0, workspace=str(tmp_path / "mine"))  # spends there
    secret = rf"^{team / 'home'}/\.fedrec-ledger\.key: the ledger secret is reached through "
    with pytest.raises(BudgetError, match=secret + rf"{team}, which every user may write to"):
        training.check_private_places(simulated)
