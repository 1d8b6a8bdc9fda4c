"""Safe promotion: two candidates deciding at once cannot both become champion, and a version
left behind by a crash between registration and promotion is marked, never promoted."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from fedrec.config import TrainingConfig
from models.promotion import PromotionDecision

SMALL = {"synthetic_users": 300, "synthetic_items": 150, "synthetic_interactions": 9_000,
         "clients": 2, "factors": 2, "rounds": 1, "model_name": "safe"}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    from flows.training import federated_training

    home = tmp_path_factory.mktemp("fedrec-safe")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDREC_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = f"sqlite:///{home / 'mlflow.db'}"
        first = federated_training(**TrainingConfig(tracking_uri=uri, **SMALL).model_dump())
        yield {
            "uri": uri,
            "client": MlflowClient(tracking_uri=uri, registry_uri=uri),
            "first": first,
        }


def _register_copy_of_champion(store) -> str:
    """A new version of the model (the champion's files again), as a run's registration does."""
    from tasks.tracking import load_recommender, register_model

    client = store["client"]
    run = client.create_run(client.get_experiment_by_name("fedrec").experiment_id)
    recommender = load_recommender(store["uri"], "models:/safe@champion")
    version = register_model.fn(store["uri"], run.info.run_id, recommender, "safe", {})
    client.set_terminated(run.info.run_id, "FINISHED")
    return version


def test_two_runs_deciding_together_cannot_both_become_champion(store):
    from tasks.tracking import record_promotion

    client = store["client"]
    champion = client.get_model_version_by_alias("safe", "champion").version
    a, b = _register_copy_of_champion(store), _register_copy_of_champion(store)
    better = PromotionDecision(True, "beats the champion")
    results: dict[str, PromotionDecision] = {}
    start = threading.Barrier(2)

    def decide(version: str) -> None:
        start.wait()  # both compared with the same champion, both decide at once
        results[version] = record_promotion.fn(store["uri"], "safe", version, better, champion)

    threads = [threading.Thread(target=decide, args=(v,)) for v in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    promoted = [v for v, d in results.items() if d.promote]
    assert len(promoted) == 1
    loser = ({a, b} - set(promoted)).pop()
    assert str(client.get_model_version_by_alias("safe", "champion").version) == promoted[0]
    assert "the champion changed to version" in results[loser].reason
    assert client.get_model_version("safe", loser).tags["fedrec.promoted"] == "false"
    # the version it replaced says so beside its own fedrec.promoted=true
    replaced = client.get_model_version("safe", champion).tags
    assert replaced["fedrec.replaced_by_version"] == promoted[0]


def test_an_orphan_version_is_marked_by_the_next_run_and_never_promoted(store, tmp_path):
    from flows.training import federated_training

    client = store["client"]
    orphan = _register_copy_of_champion(store)  # registered, then the "process died"
    assert "fedrec.promoted" not in client.get_model_version("safe", orphan).tags
    workspace = tmp_path / "orphan-workspace"  # what its killed run kept
    workspace.mkdir()
    (workspace / "manifest.json").write_text("{}")
    run_id = client.get_model_version("safe", orphan).run_id
    client.set_tag(run_id, "fedrec.workspace", str(workspace))

    federated_training(**TrainingConfig(tracking_uri=store["uri"], seed=5, **SMALL).model_dump())

    version = client.get_model_version("safe", orphan)
    tags = version.tags
    assert tags["fedrec.promoted"] == "false" and tags["fedrec.promotion_reason"].startswith(
        "orphan:"
    )
    assert version.description == f"not promoted: {tags['fedrec.promotion_reason']}"
    assert not workspace.exists()  # its run cannot be resumed: the partitions are removed
    assert str(client.get_model_version_by_alias("safe", "champion").version) != orphan


def test_an_orphans_reason_names_how_its_run_ended_and_a_killed_runs_error(store):
    """A failed run's error stays in its own tag; a run killed under its flow (its flow run
    crashed) names the error that says so in the orphan's reason."""
    import tasks.tracking as tracking

    client = store["client"]
    ended = {}
    for status in ("FAILED", "KILLED"):
        version = _register_copy_of_champion(store)
        run_id = client.get_model_version("safe", version).run_id
        client.set_tag(run_id, tracking.ERROR_TAG, f"why it ended {status}")
        client.set_terminated(run_id, status)
        ended[status] = (version, run_id)

    repaired = tracking.repair_orphans.fn(store["uri"], "safe")

    for status, said in (("FAILED", "FAILED"), ("KILLED", "KILLED: why it ended KILLED")):
        version, run_id = ended[status]
        assert repaired[version] is False
        assert client.get_model_version("safe", version).tags["fedrec.promotion_reason"] == (
            f"orphan: its training (run {run_id}, {said}) ended between registration and the "
            "promotion decision"
        )


class _Killed(BaseException):
    """The process dying at this point: nothing after it runs."""


class _DiesAtWrite:
    """An MLflow client whose process dies at its ``at``-th registry write."""

    WRITES = ("set_model_version_tag", "update_model_version", "set_registered_model_alias",
              "update_registered_model")  # fmt: skip

    def __init__(self, client: MlflowClient, at: int) -> None:
        self._client, self._at, self.writes = client, at, 0

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        if name not in self.WRITES:
            return method

        def write(*args, **kwargs):
            self.writes += 1
            if self.writes == self._at:
                raise _Killed
            return method(*args, **kwargs)

        return write


def test_a_kill_anywhere_inside_the_promotion_leaves_a_record_the_next_run_makes_true(
    store, monkeypatch
):
    """Kill the deciding process before each of its registry writes in turn; after the next
    run's repair, a version says promoted=true exactly when it holds (or held) the alias, and
    its description agrees. Writing ``fedrec.promoted`` before the alias moved failed this: a
    kill between them left a version that said promoted with the champion elsewhere."""
    import tasks.tracking as tracking

    client = store["client"]
    write_count = _DiesAtWrite(client, at=0)
    monkeypatch.setattr(tracking, "_client", lambda uri: write_count)
    champion = client.get_model_version_by_alias("safe", "champion").version
    tracking.record_promotion.fn(
        store["uri"], "safe", _register_copy_of_champion(store),
        PromotionDecision(True, "better by 0.01"), champion,
    )  # fmt: skip
    writes = write_count.writes
    assert writes >= 5
    for at in range(1, writes + 1):
        champion = client.get_model_version_by_alias("safe", "champion").version
        version = _register_copy_of_champion(store)
        dying = _DiesAtWrite(client, at)
        monkeypatch.setattr(tracking, "_client", lambda uri, dying=dying: dying)
        with pytest.raises(_Killed):
            tracking.record_promotion.fn(
                store["uri"], "safe", version, PromotionDecision(True, "better by 0.01"), champion
            )
        monkeypatch.setattr(tracking, "_client", lambda uri: client)

        repaired = tracking.repair_orphans.fn(store["uri"], "safe")

        now = str(client.get_model_version_by_alias("safe", "champion").version)
        tags = client.get_model_version("safe", version).tags
        description = client.get_model_version("safe", version).description
        promoted = now == version
        assert tags["fedrec.promoted"] == str(promoted).lower(), (at, tags, now)
        assert repaired.get(version, promoted) == promoted
        if promoted:
            assert description.startswith("promoted to champion"), (at, description)
            replaced = client.get_model_version("safe", champion).tags
            assert replaced["fedrec.replaced_by_version"] == version, at
        else:
            assert description.startswith("not promoted"), (at, description)
            assert now == str(champion), at
    # every outcome occurred: cut short before the alias moved, and after
    outcomes = {
        client.get_model_version("safe", v.version).tags.get("fedrec.promoted")
        for v in client.search_model_versions("name='safe'")
    }
    assert outcomes == {"true", "false"}


def test_a_retried_promotion_keeps_its_decision(store):
    """A retry of the decision after the alias moved (a database error on the last tag) finds
    the alias on its own version: it is the same promotion, not a champion that changed."""
    from tasks.tracking import record_promotion

    client = store["client"]
    champion = str(client.get_model_version_by_alias("safe", "champion").version)
    version = _register_copy_of_champion(store)
    better = PromotionDecision(True, "better by 0.01")
    record_promotion.fn(store["uri"], "safe", version, better, champion)

    again = record_promotion.fn(store["uri"], "safe", version, better, champion)

    assert again.promote and again.reason == "better by 0.01"
    assert str(client.get_model_version_by_alias("safe", "champion").version) == version
    assert client.get_model_version("safe", version).tags["fedrec.promoted"] == "true"
    assert client.get_model_version("safe", champion).tags["fedrec.replaced_by_version"] == version


def test_two_promotions_cut_short_in_a_row_are_both_recorded_as_champions(store, monkeypatch):
    """A moves the alias and dies; B, compared with A, moves it too and dies before tagging A
    as replaced. A held the alias: the repair must not call it an orphan."""
    import tasks.tracking as tracking

    client = store["client"]
    better = PromotionDecision(True, "better by 0.01")
    champion = first = str(client.get_model_version_by_alias("safe", "champion").version)
    decided = []
    for _ in range(2):
        version = _register_copy_of_champion(store)
        dying = _DiesAtWrite(client, at=5)  # reason, compared-with, description, alias: then dead
        monkeypatch.setattr(tracking, "_client", lambda uri, dying=dying: dying)
        with pytest.raises(_Killed):
            tracking.record_promotion.fn(store["uri"], "safe", version, better, champion)
        monkeypatch.setattr(tracking, "_client", lambda uri: client)
        assert str(client.get_model_version_by_alias("safe", "champion").version) == version
        decided.append(version)
        champion = version

    repaired = tracking.repair_orphans.fn(store["uri"], "safe")

    # (an earlier test's orphan in the shared store may be repaired too: not this test's concern)
    assert {v: repaired.get(v) for v in decided} == dict.fromkeys(decided, True)
    for version in decided:
        assert client.get_model_version("safe", version).tags["fedrec.promoted"] == "true"
    # each replaced the one before it: the versions say so
    replaced_by = {
        v: client.get_model_version("safe", v).tags.get("fedrec.replaced_by_version")
        for v in (first, *decided)
    }
    assert replaced_by == {first: decided[0], decided[0]: decided[1], decided[1]: None}


def test_a_run_with_nothing_to_train_still_finishes_a_cut_short_record(tmp_path, prefect_server):
    """The nightly run on unchanged data trains nothing; it still repairs the registry first."""
    from flows.training import federated_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = TrainingConfig(tracking_uri=uri, **(SMALL | {"model_name": "unchanged"}))
    first = federated_training(**config.model_dump())
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.delete_model_version_tag("unchanged", first["model_version"], "fedrec.promoted")

    again = federated_training(**config.model_dump())

    assert again["skipped"] is True
    tags = client.get_model_version("unchanged", first["model_version"]).tags
    assert tags["fedrec.promoted"] == "true"


def _flow_run(state, uri: str) -> str:
    """A flow run on the test's Prefect server, left in ``state``, naming the test's store as a
    training run does: a failed flow run that names no store is listed by `fedrec runs` under
    every store, other tests' among them."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name="federated-training")
    def placeholder(tracking_uri: str) -> None: ...

    with get_client(sync_client=True) as prefect:
        run = prefect.create_flow_run(placeholder, parameters={"tracking_uri": uri}, state=state)
        return str(run.id)


def test_a_version_of_a_run_whose_flow_run_crashed_is_repaired_not_left_running(store):
    """A run killed under a worker or `fedrec serve` stays RUNNING in MLflow (nothing of it is
    left to close it), and the repair left its version undecided for good. Its flow run's final
    state in Prefect tells that it decides nothing any more; a flow run still running does not.
    The flow closes such runs first, then repairs: the test calls both in that order."""
    from prefect.states import Crashed, Running

    import tasks.tracking as tracking

    client = store["client"]
    experiment = client.get_experiment_by_name("fedrec").experiment_id
    versions = {}
    for name, state in (("crashed", Crashed(message="killed")), ("running", Running())):
        version = _register_copy_of_champion(store)
        run_id = client.get_model_version("safe", version).run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "prefect.flow_run_id", _flow_run(state, store["uri"]))
        versions[name] = (version, run_id)
    assert client.search_runs([experiment], "attributes.status = 'RUNNING'")

    closed = tracking.close_ended_runs.fn(store["uri"])
    repaired = tracking.repair_orphans.fn(store["uri"], "safe")

    crashed, crashed_run = versions["crashed"]
    assert closed == [crashed_run]
    running, running_run = versions["running"]
    assert repaired[crashed] is False and running not in repaired
    tags = client.get_model_version("safe", crashed).tags
    assert (
        tags["fedrec.promoted"] == "false"
        and "KILLED: its flow run ended CRASHED" in tags["fedrec.promotion_reason"]
    )
    assert client.get_run(crashed_run).info.status == "KILLED"
    assert client.get_run(running_run).info.status == "RUNNING"  # it may be deciding now
    assert "fedrec.promoted" not in client.get_model_version("safe", running).tags
    # leave the shared store as others expect: no run left running, no version left undecided
    client.set_terminated(running_run, "FINISHED")
    client.set_model_version_tag("safe", running, "fedrec.promoted", "false")


def test_a_run_whose_flow_run_crashed_before_registering_is_closed(store):
    """A run killed with its worker before it registered anything left no version for the
    repair: its MLflow run said RUNNING for good. The next run closes it."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed, Running

    import tasks.tracking as tracking

    client = store["client"]
    experiment = client.get_experiment_by_name("fedrec").experiment_id
    runs = {}
    for name, state in (("crashed", Crashed(message="no heartbeat")), ("running", Running())):
        run_id = client.create_run(experiment).info.run_id
        client.set_tag(run_id, "prefect.flow_run_id", _flow_run(state, store["uri"]))
        runs[name] = run_id

    time.sleep(1.5)  # the next run comes later than its flow run's crash
    closed = tracking.close_ended_runs.fn(store["uri"])

    assert closed == [runs["crashed"]]
    lost = client.get_run(runs["crashed"])
    assert lost.info.status == "KILLED"
    # it ended when Prefect marked its flow run, not when the next run closed it
    with get_client(sync_client=True) as prefect:
        crashed_at = prefect.read_flow_run(lost.data.tags["prefect.flow_run_id"]).state.timestamp
    assert lost.info.end_time == int(crashed_at.timestamp() * 1000)
    assert lost.info.end_time < time.time() * 1000 - 1000
    assert lost.data.tags["fedrec.error"] == "its flow run ended CRASHED in Prefect"
    assert client.get_run(runs["running"]).info.status == "RUNNING"  # it may be training now
    client.set_terminated(runs["running"], "FINISHED")


def test_the_candidate_and_the_champion_are_compared_on_the_clients_that_answered_both(
    store, monkeypatch, caplog
):
    """A client that answers the candidate's evaluation but not the champion's would have the
    candidate judged on more clients than the champion: two figures of different rows."""
    import pandas as pd
    from prefect import task
    from prefect.cache_policies import NONE
    from prefect.runtime import task_run

    import flows.loop
    from flows.training import federated_training
    from tasks.clients import evaluate_client

    @task(name="evaluate-client", cache_policy=NONE)
    def gone_for_the_champion(**kwargs):
        if task_run.name == "evaluate champion client-0":
            raise RuntimeError("client-0 went away")
        return evaluate_client.fn(**kwargs)

    monkeypatch.setattr(flows.loop, "evaluate_client", gone_for_the_champion)
    config = TrainingConfig(tracking_uri=store["uri"], **{**SMALL, "rounds": 2})
    summary = federated_training(**config.model_dump())

    assert summary["reason"].endswith(
        "(compared on the 1 of 2 clients that answered both evaluations)"
    )
    # the run's log says so too, naming the client the champion's evaluation lacks
    assert any(
        "compared on the 1 client(s) that answered both evaluations (client-0 answered one only)"
        in r.getMessage()
        for r in caplog.records
    )
    compared, champion = summary["compared_metrics"], summary["champion_metrics"]
    assert (compared["system/compared_clients"], compared["system/evaluated_clients"]) == (1, 2)
    # the candidate's figures on client 1 alone, as its own row of the per-client table has them
    table = pd.read_csv(store["client"].download_artifacts(summary["run_id"], "client_metrics.csv"))
    alone = table.set_index("client").loc[1]
    assert compared["test/rmse"] == pytest.approx(alone["rmse"], rel=1e-12)
    assert summary["metrics"]["test/rmse"] != pytest.approx(alone["rmse"])  # two clients there
    # the champion's figures are of one client too
    assert (
        champion["valid/client_min/rmse"]
        == champion["valid/client_max/rmse"]
        == champion["valid/rmse"]
    )


def test_a_candidate_and_a_champion_answered_by_no_common_client_are_not_compared(
    store, monkeypatch
):
    from prefect import task
    from prefect.cache_policies import NONE
    from prefect.runtime import task_run

    import flows.loop
    from flows.training import federated_training
    from tasks.clients import evaluate_client

    gone = {"evaluate round-3 client-0", "evaluate champion client-1"}

    @task(name="evaluate-client", cache_policy=NONE)
    def one_each(**kwargs):
        if task_run.name in gone:
            raise RuntimeError("went away")
        return evaluate_client.fn(**kwargs)

    monkeypatch.setattr(flows.loop, "evaluate_client", one_each)
    config = TrainingConfig(tracking_uri=store["uri"], **{**SMALL, "rounds": 3})
    summary = federated_training(**config.model_dump())

    assert summary["promoted"] is False
    assert summary["reason"] == (
        "not comparable: no client answered both the candidate's and the champion's evaluation"
    )


def test_only_a_missing_model_or_alias_reads_as_no_champion(store, monkeypatch):
    """A champion lookup reads the registry's "no such model" and "no champion alias" as no
    champion; any other registry error is raised: read as no champion, it would let a candidate
    take the alias without being compared with the model that holds it."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from tasks.tracking import _champion_version

    uri, client = store["uri"], store["client"]
    assert _champion_version(uri, "never-registered") is None
    client.create_registered_model("safe-without-alias")
    assert _champion_version(uri, "safe-without-alias") is None
    assert _champion_version(uri, "safe") is not None

    for message in (
        "Registered model alias name 'champion' is reserved",  # an alias, but found
        "Model version source 'models:/safe/1' not found",  # not found, but no alias
    ):

        def other_error(self, name, alias, message=message):
            raise MlflowException(message, INVALID_PARAMETER_VALUE)

        monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", other_error)
        with pytest.raises(MlflowException, match=message):
            _champion_version(uri, "safe")
