"""The privacy ledger on a real MLflow store: a balance per user, named by a keyed hash whose
secret stays outside the store, its cap stored at first use, entries that survive deletion,
reservations serialised across processes, and a model with private versions but no ledger
refused."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedrec.config import TrainingConfig
from models.data.synthetic import generate_synthetic
from models.privacy.ledger import BudgetError, Request
from tests.flows.helpers import tracking_store

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"clients": 3, "factors": 3, "rounds": 1, "skip_if_unchanged": False}


@pytest.fixture
def store(tmp_path):
    with tracking_store(tmp_path) as store:
        yield store


# Long ids, so that finding one among the stored keyed hashes cannot happen by chance.
POPULATIONS = {
    name: np.array([f"{name}-user-{i:04d}" for i in range(40)]) for name in ("a", "b", "c")
}


def _reserve(store, epsilon, *, cap=None, cap_delta=None, set_cap=False, users="a",
             model="m", delta=1e-5, secret=None):  # fmt: skip
    from tasks.tracking import reserve_privacy_budget

    request = Request(epsilon, delta, cap, cap_delta, set_cap)
    return reserve_privacy_budget.fn(
        store["uri"],
        request,
        user_ids=POPULATIONS[users],
        model_name=model,
        fingerprint="rows",
        about={},
        secret_path=secret,
    )


def _keys(store, users):
    from models.privacy.ledger import user_keys
    from tasks.tracking import ledger_secret, ledger_secret_path

    return user_keys(users, ledger_secret(ledger_secret_path(store["uri"]), create=False))


def _ledger_runs(store):
    from mlflow.entities import ViewType

    from tasks.tracking import LEDGER_EXPERIMENT

    client = store["client"]
    experiment = client.get_experiment_by_name(LEDGER_EXPERIMENT)
    return client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)


def test_the_cap_stored_at_first_use_is_enforced_when_later_runs_omit_it(store):
    first = _reserve(store, 4.0, cap=10.0)
    second = _reserve(store, 4.0)  # no cap given: the stored one applies

    with pytest.raises(BudgetError, match=r"spent epsilon 8 of 10 .* needs epsilon 4"):
        _reserve(store, 4.0)
    with pytest.raises(BudgetError, match=r"cap is --dp-budget 10 .* asks for 100"):
        _reserve(store, 1.0, cap=100.0)
    assert (first.epsilon, second.epsilon, second.delta) == (4.0, 8.0, pytest.approx(2e-5))
    other = _reserve(store, 4.0, users="b")  # other users have their own balances
    assert other.epsilon == 4.0 and other.cap.epsilon == 4.0  # its cap: its first run's epsilon
    raised = _reserve(store, 2.0, cap=20.0, set_cap=True)  # the operator's explicit action
    assert raised.epsilon == 10.0 and raised.cap.epsilon == 20.0
    kinds = sorted(r.data.params["kind"] for r in _ledger_runs(store))
    assert kinds == ["cap", "cap", "cap", "spend", "spend", "spend", "spend"]


def test_a_ledger_longer_than_a_page_of_run_search_counts_every_entry(store, monkeypatch):
    """The attack on the cap: the ledger outgrows one page of MLflow's run search (1000 runs;
    a daily private run's entries reach that within a year), and a ledger read from its first
    page alone lets users spend past their cap. Here a page holds two runs."""
    from mlflow import MlflowClient

    search = MlflowClient.search_runs

    def two_per_page(self, *args, max_results: int = 1000, **kwargs):
        return search(self, *args, max_results=min(max_results, 2), **kwargs)

    monkeypatch.setattr(MlflowClient, "search_runs", two_per_page)
    for _ in range(4):
        spent = _reserve(store, 1.0, cap=5.0)
    assert spent.epsilon == 4.0  # a cap and four spends: three pages
    with pytest.raises(BudgetError, match=r"spent epsilon 4 of 5 .* needs epsilon 2"):
        _reserve(store, 2.0)


def test_deleting_ledger_entries_does_not_erase_the_spending(store):
    from tasks.tracking import LEDGER_EXPERIMENT

    _reserve(store, 8.0, cap=10.0)
    client = store["client"]
    for run in _ledger_runs(store):
        client.delete_run(run.info.run_id)

    with pytest.raises(BudgetError, match=r"spent epsilon 8 of 10"):
        _reserve(store, 8.0)
    client.delete_experiment(client.get_experiment_by_name(LEDGER_EXPERIMENT).experiment_id)
    with pytest.raises(BudgetError, match=r"fedrec-privacy-ledger' was deleted; restore it"):
        _reserve(store, 1.0)


def test_a_renamed_ledger_is_found_by_its_entries_and_refuses(store):
    """Renaming the ledger's experiment hid it from a lookup by name: the next run, under a
    model name with no private versions, started every user at zero."""
    from tasks.tracking import LEDGER_EXPERIMENT

    _reserve(store, 2.0, cap=3.0)
    client = store["client"]
    ledger = client.get_experiment_by_name(LEDGER_EXPERIMENT).experiment_id
    client.rename_experiment(ledger, "archive-old")

    renamed = rf"experiment 'archive-old' \(id {ledger}\) holds ledger entries, .* it was renamed"
    with pytest.raises(BudgetError, match=renamed):
        _reserve(store, 2.0, model="fresh")
    assert client.get_experiment_by_name(LEDGER_EXPERIMENT) is None  # no second ledger made
    client.delete_experiment(ledger)  # deleted as well as renamed: still its entries' home
    with pytest.raises(BudgetError, match=renamed):
        _reserve(store, 2.0, model="fresh")


def test_a_store_whose_ledger_was_purged_refuses_instead_of_starting_users_at_zero(store):
    """`mlflow gc` removes a deleted ledger for good; the file beside the store remembers that
    the store had one. Another store in the same folder starts its own ledger."""
    from tasks.tracking import LEDGER_EXPERIMENT

    _reserve(store, 2.0, cap=3.0)
    client = store["client"]
    ledger = client.get_experiment_by_name(LEDGER_EXPERIMENT).experiment_id
    client.delete_experiment(ledger)
    subprocess.run([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", store["uri"],
                    "--experiment-ids", ledger], check=True, capture_output=True)  # fmt: skip
    assert client.get_experiment_by_name(LEDGER_EXPERIMENT) is None  # gone for good

    with pytest.raises(BudgetError, match=r"says this store \(mlflow.db\) had a ledger, and it "
                       r"holds none now: its entries were purged"):  # fmt: skip
        _reserve(store, 2.0, model="fresh")
    other = {"uri": f"sqlite:///{store['home'] / 'other.db'}"}  # beside it, never ledgered
    assert _reserve(other, 2.0, cap=3.0) is not None


def _entry_files(store, kind=None, users=None):
    """The local users.u64 files of the ledger's entries (of ``kind``, or naming the same set of
    users as the population ``users``), oldest first."""
    from urllib.parse import urlparse

    digest = None
    if users is not None:
        digest = hashlib.sha256(
            _keys(store, POPULATIONS[users]).astype("<u8").tobytes()
        ).hexdigest()
    runs = sorted(_ledger_runs(store), key=lambda r: r.info.start_time)
    return [Path(urlparse(r.info.artifact_uri).path) / "users.u64" for r in runs
            if kind in (None, r.data.params["kind"])
            and digest in (None, r.data.params["users_sha256"])]  # fmt: skip


def test_the_store_holds_keyed_hashes_of_users_never_their_ids(store):
    _reserve(store, 4.0, cap=10.0)

    (spend,) = _entry_files(store, "spend")
    data = spend.read_bytes()
    assert np.frombuffer(data, "<u8").tolist() == _keys(store, POPULATIONS["a"]).tolist()
    assert len(data) == 8 * 40
    assert not any(user.encode() in data for user in POPULATIONS["a"])
    params = [r.data.params for r in _ledger_runs(store)]
    assert {p["users"] for p in params} == {"40"} and len({p["secret_id"] for p in params}) == 1
    assert not any(user in str(p) for p in params for user in POPULATIONS["a"])


def test_a_lost_or_foreign_secret_refuses_instead_of_starting_users_at_zero(store, tmp_path):
    from tasks.tracking import ledger_secret_path

    _reserve(store, 4.0, cap=10.0)
    path = ledger_secret_path(store["uri"])
    saved = path.read_bytes()
    assert path.stat().st_mode & 0o777 == 0o600 and len(saved) == 32

    path.unlink()
    with pytest.raises(BudgetError, match=r"with secret [0-9a-f]{16} and no file is there .*: not"):
        _reserve(store, 4.0)
    path.write_bytes(bytes(32))
    path.chmod(0o600)
    with pytest.raises(BudgetError, match=r"and that file is secret [0-9a-f]{16} \("):
        _reserve(store, 4.0)
    path.write_bytes(saved[:31])  # a copy cut short
    with pytest.raises(
        BudgetError, match=rf"^{path}: a ledger secret is 32 bytes, this file has 31$"
    ):
        _reserve(store, 4.0)
    path.unlink()
    (tmp_path / "elsewhere").write_bytes(saved)
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BudgetError, match="symbolic link; refused"):
        _reserve(store, 4.0)
    # named by --dp-ledger-secret or a YAML key, the link is refused too: making the flag's
    # path absolute does not follow it first
    from fedrec.inputs import absolute_paths, file_relative_paths

    (tmp_path / "link.key").symlink_to(tmp_path / "elsewhere")
    for values in (absolute_paths({"dp_ledger_secret": str(tmp_path / "link.key")}),
                   file_relative_paths({"dp_ledger_secret": "link.key"}, tmp_path)):  # fmt: skip
        assert values["dp_ledger_secret"] == str(tmp_path / "link.key")
        with pytest.raises(BudgetError, match="symbolic link; refused"):
            _reserve(store, 4.0, secret=values["dp_ledger_secret"])
    path.unlink()
    path.write_bytes(saved)
    path.chmod(0o644)
    with pytest.raises(
        BudgetError, match="mode 0644: others may read or write it; it must be 0600"
    ):
        _reserve(store, 4.0)
    path.chmod(0o600)
    assert _reserve(store, 4.0).epsilon == 8.0  # the right secret: the history is found


def test_an_altered_user_set_counts_for_everyone_and_frees_no_one(store):
    from tasks.tracking import ledger_secret_path

    _reserve(store, 4.0, cap=10.0, users="a", delta=1e-9)
    _reserve(store, 4.0, cap=10.0, users="a", delta=1e-9)
    _reserve(store, 4.0, cap=10.0, users="b", delta=1e-9)
    for entry in _entry_files(store, users="a"):  # who can write to the artifact store empties
        entry.write_bytes(b"")  # every entry naming a's users (the sets are content-addressed)

    # the sets this machine read before are kept under their digest: still exact
    with pytest.raises(BudgetError, match=r"spent epsilon 8 of 10"):
        _reserve(store, 4.0, users="a")
    assert _reserve(store, 1.0, users="b", delta=1e-9).epsilon == 5.0
    cache = ledger_secret_path(store["uri"]).parent / ".fedrec-ledger-cache"
    kept = sorted(cache.iterdir())
    assert kept and all(f.stat().st_mode & 0o777 == 0o600 for f in kept)
    for f in kept:  # a kept copy that no longer matches its digest is not used either
        f.write_bytes(f.read_bytes()[8:])

    with pytest.raises(BudgetError, match=r"spent epsilon 8 of 10"):
        _reserve(store, 4.0, users="a")  # a's spending was not erased...
    with pytest.raises(BudgetError, match=r"spent epsilon 13 of 10"):
        _reserve(store, 1.0, users="b")  # ...it now counts for b too: an over-count


def _private_version(store, model, epsilon, *, experiment="fedrec"):
    """Register a version of `model` that spent `epsilon` from a bare run, outside any ledger;
    returns the store's MLflow client."""
    from tasks.tracking import _client, register_model
    from tests.flows.test_safe_loading import _recommender

    client = _client(store["uri"])
    # artifacts in the test's folder: without a location MLflow writes ./mlruns where pytest runs
    artifacts = (store["home"] / "mlartifacts").as_uri()
    run = client.create_run(client.create_experiment(experiment, artifacts)).info.run_id
    register_model.fn(store["uri"], run, _recommender(), model, {"fedrec.epsilon": str(epsilon)})
    return client


def test_private_versions_without_a_ledger_refuse_to_start(store):
    _private_version(store, "m", 8.0)

    with pytest.raises(
        BudgetError, match=r"'m' has private versions \(epsilon 8 in all\) but the ledger"
    ):
        _reserve(store, 1.0, model="m")
    assert _reserve(store, 1.0, model="other").epsilon == 1.0  # no private versions: fine
    recovered = _reserve(store, 1.0, model="m", users="c", cap=20.0, set_cap=True)
    assert recovered.epsilon == 9.0  # the version's 8 recorded as spent, then this run's 1
    assert _reserve(store, 1.0, model="m", users="c").epsilon == 10.0


def test_the_former_ledger_tags_spending_of_runs_that_registered_nothing_is_counted(store):
    """A model's former JSON ledger tag that records more than its private versions (runs that
    registered nothing spent too) is recovered as the versions' epsilons plus that surplus."""
    from tasks.tracking import _LEGACY_LEDGER_TAG

    client = _private_version(store, "m", 8.0)
    client.set_registered_model_tag("m", _LEGACY_LEDGER_TAG, json.dumps({"a": 8.0, "b": 3.0}))

    with pytest.raises(BudgetError, match=r"'m' has private versions \(epsilon 11 in all\)"):
        _reserve(store, 1.0, model="m")
    assert _reserve(store, 1.0, model="m", users="c", cap=20.0, set_cap=True).epsilon == 12.0


def test_budget_counts_the_private_versions_the_ledger_lacks_as_the_run_does(store, tmp_path):
    """`fedrec budget --dp-ledger-set-cap` adds a model's private versions outside the ledger
    (epsilon 0.5 each, one run's delta each) to every user's spending, as the run would."""
    _private_version(store, "m", 0.5)
    _private_version(store, "m", 0.5, experiment="elsewhere")
    path = tmp_path / "ratings.csv"
    users = POPULATIONS["a"]
    pd.DataFrame(
        {"user_id": np.repeat(users, 3), "item_id": np.tile(["i1", "i2", "i3"], len(users)),
         "rating": 4.0}
    ).to_csv(path, index=False)  # fmt: skip
    run = ("--model-name", "m", "--dp-delta", "1e-5", "--dp-budget", "10", "--dp-ledger-set-cap")

    roomy = ("--dp-budget-delta", "1e-3")  # only epsilon can refuse
    _, fits = _budget(path, *run, *roomy, "--dp-epsilon", "9")  # 0.5 + 0.5 + 9 = 10
    assert fits["run"]["refused"] is None
    status, over = _budget(path, *run, *roomy, "--dp-epsilon", "9.5")
    assert status == 2 and "spent epsilon 1 of 10" in over["run"]["refused"]
    # the delta cap: the versions' 2e-5 and this run's 1e-5 exceed 2.5e-5
    status, deltas = _budget(path, *run, "--dp-epsilon", "2", "--dp-budget-delta", "2.5e-5")
    assert status == 2
    assert "spent epsilon 1 of 10 and delta 2e-05 of 2.5e-05" in deltas["run"]["refused"]
    assert _budget(path, *run, "--dp-epsilon", "2", "--dp-budget-delta", "3e-5")[0] == 0

    with pytest.raises(BudgetError) as refused:  # the run's own reservation: the oracle
        _reserve(store, 9.5, cap=10.0, cap_delta=1e-3, set_cap=True)
    assert over["run"]["refused"] == str(refused.value)


def test_a_reservation_raced_past_the_cap_on_a_remote_store_is_refused(store, monkeypatch):
    import tasks.tracking as tracking
    from models.privacy.ledger import Entry, Stored, plan_user_reservation

    monkeypatch.setattr(tracking, "promotion_lock", lambda uri: contextlib.nullcontext())
    _reserve(store, 4.0, cap=10.0)
    keys = _keys(store, POPULATIONS["a"])

    def plan_while_another_writes(groups, request, *, at):
        writes = plan_user_reservation(groups, request, at=at)
        # another machine's reservation lands between this one's read and its write
        client = tracking._client(store["uri"])
        experiment = client.get_experiment_by_name(tracking.LEDGER_EXPERIMENT).experiment_id
        rival = Stored(Entry("spend", 4.0, 1e-5, at=at - 1), keys)
        tracking._write_entry(client, experiment, rival, {})
        return writes

    monkeypatch.setattr(tracking, "plan_user_reservation", plan_while_another_writes)

    with pytest.raises(BudgetError, match=r"concurrent reservation .* epsilon 12 of 10"):
        _reserve(store, 4.0)
    monkeypatch.undo()
    with pytest.raises(BudgetError, match="spent epsilon 12 of 10"):  # the loser stays counted
        _reserve(store, 0.5)


_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from models.privacy.ledger import BudgetError, Request
    from tasks.tracking import reserve_privacy_budget

    uri, folder, me, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    (folder / f"ready-{me}").touch()
    while len(list(folder.glob("ready-*"))) < n:  # start together once every process imported
        time.sleep(0.01)
    try:
        reserve_privacy_budget.fn(uri, Request(4.0, 1e-5, 10.0), user_ids=np.array(["s1", "s2"]),
                                  model_name=me, fingerprint="rows", about={})
        print("reserved")
    except BudgetError:
        print("refused")
    """
)


def test_concurrent_reservations_from_several_processes_stay_within_the_cap(store, tmp_path):
    from mlflow.entities import ViewType

    from tasks.tracking import _client, _ledger_experiment, ledger_groups

    _ledger_experiment(_client(store["uri"]), store["uri"])  # the store exists before the race
    _reserve(store, 1e-9, users="b")  # so is the secret (its creation has a test of its own)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    folder = tmp_path / "barrier"
    folder.mkdir()
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
    command = [sys.executable, str(script), store["uri"], str(folder)]

    def start(i: int) -> subprocess.Popen:
        return subprocess.Popen([*command, f"p{i}", "4"], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    workers = [start(i) for i in range(4)]
    answers = []
    for worker in workers:
        out, err = worker.communicate(timeout=240)
        assert worker.returncode == 0, err[-2000:]
        answers.append(out.strip().splitlines()[-1])

    client = _client(store["uri"])
    experiment = _ledger_experiment(client, store["uri"])
    (shared,) = ledger_groups(client, experiment, _keys(store, ["s1", "s2"]))
    spent = shared.balance
    assert sorted(answers) == ["refused", "refused", "reserved", "reserved"]
    assert (spent.epsilon, spent.spends) == (8.0, 2)  # refused before writing: nothing wasted
    assert len(client.search_runs([experiment], run_view_type=ViewType.ALL)) == 2 + 3  # b; cap + 2


# --- the flow path --------------------------------------------------------------------------


def _write_ratings(path: Path) -> pd.DataFrame:
    data = generate_synthetic(n_users=300, n_items=120, n_interactions=9_000, seed=3)
    frame = pd.DataFrame(
        {
            "user_id": data.user_ids[data.frame["user"].to_numpy()],
            "item_id": data.item_ids[data.frame["item"].to_numpy()],
            "rating": data.frame["rating"].to_numpy(),
        }
    )
    frame.to_csv(path, index=False)
    return frame


def _train(store, **fields):
    from flows.training import federated_training

    config = TrainingConfig(tracking_uri=store["uri"], **(SMALL | fields))
    return federated_training(**config.model_dump())


def test_the_ledger_follows_the_users_not_the_path_spelling_or_model_name(
    store, tmp_path, prefect_server
):
    frame = _write_ratings(tmp_path / "ratings.csv")
    shutil.copy(tmp_path / "ratings.csv", tmp_path / "renamed.csv")
    last = frame.groupby("user_id").tail(1).index  # every user keeps rows in the train file
    frame.drop(index=last).to_csv(tmp_path / "train.csv", index=False)
    frame.loc[last].to_csv(tmp_path / "test.csv", index=False)
    refused = r"privacy budget: (these|\d+ of these \d+) users have spent epsilon 4 of 6"
    from click.testing import CliRunner

    from fedrec.cli import main

    def listed() -> list[dict]:
        out = CliRunner().invoke(main, ["runs", "--tracking-uri", store["uri"], "--json"]).stdout
        return [json.loads(line) for line in out.splitlines()]

    # the session's Prefect server may hold failed runs of other tests that name no store
    earlier = {r["prefect_flow_run_id"] for r in listed()}
    first = _train(store, data=str(tmp_path / "ratings.csv"), model_name="private-a",
                   dp_epsilon=4.0, dp_budget=6.0)  # fmt: skip
    with pytest.raises(ValueError, match=refused):
        _train(store, data=str(tmp_path / "renamed.csv"), model_name="private-a",
               dp_epsilon=4.0, dp_budget=6.0)  # fmt: skip
    with pytest.raises(ValueError, match=refused):
        _train(store, data=str(tmp_path / "ratings.csv"), model_name="private-b",
               dp_epsilon=4.0, dp_budget=6.0)  # fmt: skip
    with pytest.raises(ValueError, match=refused):
        _train(store, train=str(tmp_path / "train.csv"), test=str(tmp_path / "test.csv"),
               model_name="private-c", dp_epsilon=4.0)  # fmt: skip
    # a made-up user added, or one user dropped: each real user's balance is what it was
    dummy = pd.DataFrame({"user_id": "made-up", "item_id": frame["item_id"].unique()[:6],
                          "rating": 4.0})  # fmt: skip
    pd.concat([frame, dummy]).to_csv(tmp_path / "plus-one.csv", index=False)
    frame[frame["user_id"] != frame["user_id"].iloc[0]].to_csv(tmp_path / "minus-one.csv",
                                                                index=False)  # fmt: skip
    for changed in ("plus-one.csv", "minus-one.csv"):
        with pytest.raises(ValueError, match=refused):
            _train(store, data=str(tmp_path / changed), model_name="private-a",
                   dp_epsilon=4.0)  # fmt: skip

    client = store["client"]
    assert client.get_model_version("private-a", first["model_version"]).tags["fedrec.epsilon"]
    rows = [r for r in listed() if r["prefect_flow_run_id"] not in earlier]
    (row,) = [r for r in rows if r["in_mlflow"]]  # the refused runs made no MLflow run
    assert (row["run_id"], row["epsilon"]) == (first["run_id"], 4.0)
    # each refusal is listed from Prefect, newest first, with the refusal's line
    refusals = [r for r in rows if not r["in_mlflow"] and "privacy budget" in (r["error"] or "")]
    assert len(refusals) == 5 and rows.index(row) == len(rows) - 1
    assert all(r["status"] == "FAILED" and r["error"].startswith("BudgetError: ") for r in refusals)
    # each names its data, the sites or train file before data (newest first)
    assert [Path(r["source"]).name for r in refusals] == [
        "minus-one.csv", "plus-one.csv", "train.csv", "ratings.csv", "renamed.csv"
    ]  # fmt: skip
    text = CliRunner().invoke(main, ["runs", "--tracking-uri", store["uri"]]).stdout
    assert "private, epsilon 4: private-a version 1 " in text
    for name in ("private-b", "private-c"):  # refused before any run or version
        assert client.search_model_versions(f"name='{name}'") == []
    entries = _ledger_runs(store)
    assert sorted(r.data.params["kind"] for r in entries) == ["cap", "spend"]
    spend = next(r for r in entries if r.data.params["kind"] == "spend")
    assert float(spend.data.params["delta"]) == pytest.approx(1 / 300)
    assert spend.data.params["source"].endswith("ratings.csv")
    assert np.isclose(float(spend.data.params["epsilon"]), 4.0)


def test_a_flow_with_private_versions_but_no_ledger_refuses_in_one_line(store, prefect_server):
    client = _private_version(store, "old-private", 2.0, experiment="elsewhere")

    with pytest.raises(
        ValueError,
        match=r"^privacy ledger: 'old-private' has private versions \(epsilon 2 in all\)",
    ):
        _train(store, synthetic_users=200, synthetic_items=80, synthetic_interactions=4_000,
               model_name="old-private", dp_epsilon=1.0)  # fmt: skip
    assert len(client.search_model_versions("name='old-private'")) == 1


# --- fedrec budget: the ledger read as a run reads it ----------------------------------------


def _invoke_budget(path: Path, *flags: str):
    from click.testing import CliRunner

    from fedrec.cli import main

    return CliRunner().invoke(main, ["budget", "--data", str(path), *flags])


def _budget(path: Path, *flags: str) -> tuple[int, dict]:
    result = _invoke_budget(path, "--json", *flags)
    assert result.exit_code in (0, 2), result.output
    return result.exit_code, json.loads(result.stdout)


def _ledger_state(store) -> tuple[list[str], bytes | None]:
    """The ledger's entries and its secret file: what `fedrec budget` must leave as it found."""
    from tasks.tracking import LEDGER_EXPERIMENT, ledger_secret_path

    secret = ledger_secret_path(store["uri"])
    if store["client"].get_experiment_by_name(LEDGER_EXPERIMENT) is None:
        runs = []
    else:
        runs = sorted(r.info.run_id for r in _ledger_runs(store))
    return runs, secret.read_bytes() if secret.exists() else None


def test_budget_gives_each_users_balance_and_the_verdict_the_run_itself_gets(store, tmp_path):
    from tasks.tracking import reserve_privacy_budget

    users = np.concatenate([POPULATIONS["a"], POPULATIONS["b"][:10]])  # 40 with a history, 10 new
    path = tmp_path / "ratings.csv"
    pd.DataFrame(
        {"user_id": np.repeat(users, 3), "item_id": np.tile(["i1", "i2", "i3"], len(users)),
         "rating": 4.0}
    ).to_csv(path, index=False)  # fmt: skip
    db = tmp_path / "nothing-here" / "mlflow.db"
    named = ("--tracking-uri", f"sqlite:///{db}")

    mistyped = _invoke_budget(path, *named)  # a folder that does not exist: refused as by a run
    assert mistyped.exit_code == 2 and f"folder {db.parent} does not exist" in mistyped.stderr
    db.parent.mkdir()
    status, fresh = _budget(path, *named)  # no store yet: said, and not created
    assert status == 0 and list(db.parent.iterdir()) == []
    assert fresh["store_exists"] is False
    _, asked = _budget(path, *named, "--dp-epsilon", "2", "--dp-budget", "8")
    assert asked["run"]["refused"] is None and list(db.parent.iterdir()) == []
    assert asked["run"]["stores_caps"] == [{"users": 50, "epsilon": 8.0, "delta": 0.02 * 8 / 2}]
    assert asked["run"]["warning"] is None
    _, weak = _budget(path, *named, "--dp-epsilon", "12")
    assert weak["run"]["warning"].startswith("epsilon 12 is a weak guarantee")
    assert (
        "warning: epsilon 12 is a weak" in _invoke_budget(path, *named, "--dp-epsilon", "12").stdout
    )
    assert "privacy ledger of sqlite:" in _invoke_budget(path, *named).stdout
    assert "no MLflow store there yet" in _invoke_budget(path, *named).stdout
    assert fresh["ledger_entries"] == 0 and fresh["run"] is None
    assert fresh["groups"] == [{"users": 50, "epsilon": 0.0, "delta": 0.0, "runs": 0,
                                "cap_epsilon": None, "cap_delta": None, "epsilon_left": None,
                                "delta_left": None}]  # fmt: skip

    _reserve(store, 4.0, cap=10.0, users="a")  # delta 1e-5: a delta cap of 2.5e-5
    before = _ledger_state(store)
    status, found = _budget(path)
    assert status == 0 and found["ledger_entries"] == 2 and _ledger_state(store) == before
    tight, new = found["groups"]  # tightest first
    assert (tight["users"], tight["epsilon"], tight["cap_epsilon"], tight["runs"]) == (40, 4, 10, 1)
    assert tight["epsilon_left"] == pytest.approx(6.0)
    assert tight["delta_left"] == pytest.approx(1.5e-5)
    assert (new["users"], new["cap_epsilon"], new["runs"]) == (50 - 40, None, 0)

    def reserve(epsilon: float) -> str | None:  # the run's own reservation: the oracle
        try:
            reserve_privacy_budget.fn(store["uri"], Request(epsilon, 1e-5), user_ids=users,
                                      model_name="fedrec-mf", fingerprint="rows", about={})  # fmt: skip
        except BudgetError as err:
            return str(err)
        return None

    asked = ["--dp-epsilon", "6.5", "--dp-delta", "1e-5"]
    status, over = _budget(path, *asked)
    assert status == 2 and _ledger_state(store) == before
    assert over["run"] == {
        "epsilon": 6.5,
        "delta": 1e-5,
        "refused": reserve(6.5),
        "stores_caps": [],
        "warning": None,
    }
    assert over["run"]["refused"].startswith("privacy budget: 40 of these 50 users have spent")
    assert _ledger_state(store) == before  # the refused reservation wrote nothing either

    status, fits = _budget(path, "--dp-epsilon", "6", "--dp-delta", "1e-5")
    assert status == 0 and fits["run"]["refused"] is None
    # the 10 users without a cap would get this run's epsilon as theirs: one such run, said
    assert fits["run"]["stores_caps"] == [{"users": 10, "epsilon": 6.0, "delta": 1e-5}]
    said = _invoke_budget(path, "--dp-epsilon", "6", "--dp-delta", "1e-5").stdout
    assert (
        "and store the cap of 10 users without one: epsilon 6, delta 1e-05 (this run alone" in said
    )
    assert reserve(6.0) is None
    status, after = _budget(path)
    spent = {g["users"]: (g["epsilon"], g["cap_epsilon"], g["runs"]) for g in after["groups"]}
    assert spent == {40: (pytest.approx(10.0), 10.0, 2), 10: (6.0, 6.0, 1)}

    text = _invoke_budget(path, *asked)
    assert text.exit_code == 2
    assert "40 users: spent epsilon 10 of 10" in text.stdout
    assert text.stderr.strip() == f"fedrec: error: {reserve(6.5)}"

    from tasks.tracking import LEDGER_EXPERIMENT

    client = store["client"]
    client.delete_experiment(client.get_experiment_by_name(LEDGER_EXPERIMENT).experiment_id)
    deleted = _invoke_budget(path)
    assert deleted.exit_code == 2
    assert "fedrec-privacy-ledger' was deleted; restore it" in deleted.stderr
    assert not deleted.stderr.strip().endswith("not started")  # nothing was to start


def test_a_partition_the_data_cannot_meet_spends_no_budget_and_starts_no_run(store, prefect_server):
    """Refused before the reservation and the MLflow run: a deployment's parameters reach the
    flow unchecked by the command line."""
    from models.data.errors import DataValidationError

    before = _ledger_state(store)
    with pytest.raises(DataValidationError, match="more clients than the data has users"):
        _train(store, synthetic_users=50, synthetic_items=40, synthetic_interactions=1_000,
               clients=60, model_name="too-many", dp_epsilon=1.0)  # fmt: skip
    client = store["client"]
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments) == [] and _ledger_state(store) == before
    assert before == ([], None)  # nothing was written: no entry, not even the secret

    # `fedrec runs` lists it from Prefect, where it is (the session's other flow runs name
    # other stores, or none: those with none may be listed too)
    from click.testing import CliRunner

    from fedrec.cli import main

    listed = CliRunner().invoke(main, ["runs", "--json", "--tracking-uri", store["uri"]])
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    (row,) = [r for r in rows if "value 60 is more clients" in (r["error"] or "")]
    assert (row["status"], row["in_mlflow"], row["run_id"], row["epsilon"]) == (
        "FAILED",
        False,
        None,
        1.0,
    )
    assert row["error"].startswith("DataValidationError: ")
    assert row["source"] == "synthetic"  # the built-in data, by its name
    assert row["paused_seconds"] == 0.0  # Prefect records no time spent ended
    assert all(not r["in_mlflow"] for r in rows)  # this store has no MLflow run
    text = CliRunner().invoke(main, ["runs", "--tracking-uri", store["uri"]]).stdout
    assert "(Prefect flow run; it ended before its MLflow run)" in text


def test_runs_lists_a_refusal_and_an_earlier_run_of_the_same_second_newest_first(
    store, prefect_server
):
    """A refusal Prefect holds and an MLflow run that started 1 ms before it are merged by
    when each started, not by the second shown: the refusal is listed first."""
    from datetime import UTC

    from click.testing import CliRunner
    from prefect.client.orchestration import get_client

    from fedrec.cli import main
    from models.data.errors import DataValidationError

    with pytest.raises(DataValidationError, match="more clients than the data has users"):
        _train(store, synthetic_users=50, synthetic_items=40, synthetic_interactions=1_000,
               clients=60, model_name="too-many", dp_epsilon=1.0)  # fmt: skip

    def listed() -> list[dict]:
        out = CliRunner().invoke(main, ["runs", "--json", "--tracking-uri", store["uri"]])
        assert out.exit_code == 0, out.output
        return [json.loads(line) for line in out.stdout.splitlines()]

    (refusal,) = [r for r in listed() if "value 60 is more clients" in (r["error"] or "")]
    with get_client(sync_client=True) as prefect:
        began = prefect.read_flow_run(refusal["prefect_flow_run_id"]).start_time
    assert refusal["started_at"] == began.astimezone(UTC).isoformat(timespec="milliseconds")
    assert refusal["started"] == began.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    client = store["client"]
    experiment = client.create_experiment("earlier")
    earlier = client.create_run(experiment, start_time=int(began.timestamp() * 1000) - 1,
                                tags={"fedrec.config_hash": "0"})  # fmt: skip
    order = [r["run_id"] or r["prefect_flow_run_id"] for r in listed()]
    assert order.index(refusal["prefect_flow_run_id"]) < order.index(earlier.info.run_id)


def test_a_private_run_whose_secret_others_could_swap_ends_before_any_server_or_run(tmp_path):
    """The command refuses in one line (exit 2) before it reaches Prefect: the API named here
    answers nothing, so a later refusal would have been "server down" (exit 1)."""
    import os

    shared = tmp_path / "team"
    shared.mkdir()
    shared.chmod(0o777)
    env = os.environ | {
        "FEDREC_HOME": str(shared / "home"),
        "PREFECT_API_URL": "http://127.0.0.1:9/api",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-c", "from fedrec.cli import main; main()", "train", "--dp-epsilon", "8",
         "--rounds", "1", "--workspace", str(tmp_path / "mine" / "ws")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fedrec: error: {shared / 'home' / '.fedrec-ledger.key'}: the ledger")
    assert f"reached through {shared}, which every user may write to" in last
    assert "--dp-ledger-secret" in last
    assert list(shared.iterdir()) == []  # no store, secret, ledger or FEDREC_HOME folder
    asked = subprocess.run(  # fedrec budget says so too, where it said "would start"
        [sys.executable, "-c", "from fedrec.cli import main; main()", "budget", "--dp-epsilon", "8"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert asked.returncode == 2 and asked.stderr.strip().splitlines()[-1] == last, asked.stderr
    default = subprocess.run(  # FEDREC_HOME's workspaces: its clients' answers would go there
        [sys.executable, "-c", "from fedrec.cli import main; main()", "train", "--dp-epsilon", "8"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert default.returncode == 2, default.stderr
    assert (
        default.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"fedrec: error: {shared / 'home' / 'workspaces'}: the run's workspace is reached through "
            f"{shared}, which every user may write to"
        )
    )
    assert list(shared.iterdir()) == []


@pytest.mark.parametrize(
    "kind", [{"dp_epsilon": 8.0}, {"secure_aggregation": True}], ids=["private", "secure"]
)
def test_a_private_run_whose_workspace_others_could_write_spends_nothing(store, tmp_path, kind):
    """Its clients keep their answers (DP) or their updates until they are masked (secure
    aggregation) in the workspace, which a private file's rules cover: a run that would fail on
    them after its reservation refuses before it instead (a deployment's run takes this path;
    the command line checks the same before a server starts)."""
    from models.files import UnsafeFile

    shared = tmp_path / "team"
    shared.mkdir()
    shared.chmod(0o777)
    _reserve(store, 1.0, cap=10.0)  # a ledger to count entries in
    before = len(_ledger_runs(store))
    for workspace in (shared / "ws", shared):  # a folder in it, or that folder itself
        with pytest.raises(UnsafeFile, match=rf"{workspace}: the run's workspace is reached "
                           rf"through {shared}, which every user may write to.*give --workspace "
                           r"DIR in a folder of your own"):  # fmt: skip
            _train(store, **kind, workspace=str(workspace), model_name="shared-ws")
    assert len(_ledger_runs(store)) == before  # nothing spent
    assert list(shared.iterdir()) == []
    client = store["client"]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [r for r in runs if r.data.tags.get("fedrec.model_name") == "shared-ws"]
