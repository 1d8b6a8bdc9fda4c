"""A real federation on one machine: PostgreSQL-backed Prefect and MLflow servers, three site
processes that each hold only their own rows, and `fedrec train --sites` as the coordinator.

Checked: the model equals the in-process reference loop on the same per-site data to 1e-8; no
user id of any site reaches the coordinator's workspace, home, the artifact store or either
database; a process answering as a site with the wrong key is refused; a site killed mid-run
is left out by the quorum of a private run, and the same site restarted on its state folder
rejoins it; a run that samples two of the three sites each round equals the reference loop
sampling the same way, its resting site evaluating each round; a securely aggregated run, one
of whose sites names its items by text codes, equals the same reference; a run without DP is
refused before it starts by sites that answer only private runs, and under DP each site that
pins its peers' keys counts its masked answers at the full noise.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from fedrec.stores import postgres_bindir
from models.sites.budget import SITE_RUN_DELTA, Release, run_epsilon
from tests.e2e.stores import postgres_stores  # noqa: F401  (the module's servers)

SITES = ("shop-a", "shop-b", "shop-c")
# Site s, user u has id USER_BASE + 1000 s + u: 15 digits, so a search for them cannot hit a
# 13-digit millisecond timestamp by chance, and below 2**53, so a float64 holds them exactly.
USER_BASE = 917_000_000_000_000
DEADLINE = 15  # seconds a request waits for a site before the quorum decides
CLI = Path(sys.executable).parent / "fedrec"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _site_rows(site: int, rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for user in range(30):
        items = rng.choice(80, size=int(rng.integers(8, 20)), replace=False) + 1 + 10 * site
        for item in items:
            rows.append(
                (
                    USER_BASE + 1000 * site + user,
                    int(item),
                    float(rng.integers(1, 6)),
                    1_600_000_000 + int(rng.integers(0, 10**6)),
                )
            )
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


class Federation:
    """The sites' folders and processes, the coordinator's folder, and how to run each."""

    def __init__(self, root: Path, stores) -> None:
        self.root, self.stores = root, stores
        self.keys = root / "keys"
        self.coordinator = root / "coordinator"
        self.coordinator.mkdir(parents=True)
        self.processes: dict[str, subprocess.Popen] = {}
        rng = np.random.default_rng(5)
        for index, name in enumerate(SITES):
            folder = root / "sites" / name
            folder.mkdir(parents=True)
            _site_rows(index, rng).to_csv(folder / "ratings.csv", index=False)
        for name in ("coordinator", *SITES, "impostor"):
            done = subprocess.run(
                [str(CLI), "keygen", "--name", name, "--out", str(self.keys)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
        sites = "".join(
            f"  - name: {n}\n    public_key: {self.keys}/{n}.pub\n"
            f"    deadline_seconds: {DEADLINE}\n"
            for n in SITES
        )
        (self.coordinator / "sites.yaml").write_text(
            f"coordinator_key: {self.keys}/coordinator.key\nsites:\n{sites}"
        )
        # a published catalogue, for sites that send no item ids: it lacks items 91 to 100,
        # some of which shop-c's users rated
        (self.coordinator / "items.csv").write_text(
            "item_id\n" + "".join(f"{i}\n" for i in range(1, 91))
        )
        (self.coordinator / "sites-catalogue.yaml").write_text(
            f"coordinator_key: {self.keys}/coordinator.key\ncatalogue: items.csv\nsites:\n{sites}"
        )
        (self.coordinator / "run.yaml").write_text("task_retries: 0\n")
        (self.coordinator / "peers.yaml").write_text(f"sites:\n{sites}")  # for --peers

    def start_site(
        self,
        name: str,
        *,
        key: str | None = None,
        label: str | None = None,
        poll: float = 5.0,
        events: bool = True,
        exact: bool = True,
        peers: bool = False,
        data: str = "ratings.csv",
    ) -> None:
        """Start ``name``'s process (with another identity ``key`` when impersonating) on its
        folder's ``data``; it finds requests on the events websocket, or by polling alone
        without ``events``. With ``exact`` it answers runs without DP too; with ``peers`` it
        pins its peers' keys."""
        label = label or name
        folder = self.root / "sites" / name
        log = open(self.root / f"{label}.log", "a")  # noqa: SIM115 (the process holds it)
        self.processes[label] = subprocess.Popen(
            [
                str(CLI),
                "site",
                "run",
                "--name",
                name,
                "--data",
                str(folder / data),
                "--prefect-api",
                self.stores.prefect_api,
                "--mlflow",
                self.stores.mlflow_uri,
                "--identity",
                str(self.keys / f"{key or name}.key"),
                "--coordinator-key",
                str(self.keys / "coordinator.pub"),
                "--state-dir",
                str(self.root / "state" / label),
                "--poll",
                str(poll),
                "--events" if events else "--no-events",
                *(["--allow-exact"] if exact else []),
                *(["--peers", str(self.coordinator / "peers.yaml")] if peers else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=folder,
        )

    def log(self, label: str) -> str:
        path = self.root / f"{label}.log"
        return path.read_text() if path.exists() else ""

    def start_sites(self) -> None:
        """The fixture's sites, each as ``start_site`` would: shop-a polling only (slower than
        an impostor), the others woken by the events websocket; every one answers exact runs."""
        for name in SITES:
            if name not in self.processes:
                self.start_site(
                    name, **({"poll": 1.0, "events": False} if name == "shop-a" else {})
                )

    def reset(self) -> None:
        """Back to the fixture's sites: whatever a test started under another label is stopped,
        a fixture site it stopped is started again (on its own state folder) and is waited for."""
        for label in [label for label in self.processes if label not in SITES]:
            self.stop(label)
        started = {n: self.log(n).count("polling") for n in SITES if n not in self.processes}
        self.start_sites()
        for name, before in started.items():
            _wait_for(lambda n=name, b=before: self.log(n).count("polling") > b, f"{name} to start")

    def stop(self, label: str, signum: int = signal.SIGTERM) -> None:
        process = self.processes.pop(label)
        process.send_signal(signum)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)

    def train(
        self,
        workspace: str,
        rounds: int,
        stderr_path: Path,
        *flags: str,
        sites: str = "sites.yaml",
        keep: bool = True,
    ) -> subprocess.Popen:
        """A `fedrec train --sites` process (its stderr in ``stderr_path``; --json on stdout)."""
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env |= {
            "PREFECT_API_URL": self.stores.prefect_api,
            "FEDREC_HOME": str(self.coordinator / "home"),
        }
        return subprocess.Popen(
            [
                str(CLI),
                "train",
                "--sites",
                sites,
                "--config",
                "run.yaml",
                "--rounds",
                str(rounds),
                "--factors",
                "4",
                "--min-clients",
                "2",
                "--round-timeout",
                "120",
                "--tracking-uri",
                self.stores.mlflow_uri,
                "--workspace",
                str(self.coordinator / workspace),
                "--json",
                *(["--keep-workspace"] if keep else []),
                *flags,
            ],
            env=env,
            cwd=self.coordinator,
            stdout=subprocess.PIPE,
            stderr=open(stderr_path, "w"),
            text=True,
        )


@pytest.fixture(scope="module")
def sites_running(postgres_stores, tmp_path_factory) -> Iterator[Federation]:  # noqa: F811
    fed = Federation(tmp_path_factory.mktemp("federation"), postgres_stores)
    fed.start_sites()
    try:
        yield fed
    finally:
        for label in list(fed.processes):
            fed.stop(label)


@pytest.fixture
def federation(sites_running: Federation) -> Iterator[Federation]:
    """The module's federation, with its sites as the fixture started them after each test:
    a test that stops, restarts or replaces a site leaves the next one what it expects."""
    yield sites_running
    sites_running.reset()


def _summary(process: subprocess.Popen, stderr_path: Path, timeout: float = 600) -> dict:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr_path.read_text()[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def _reference_run(
    fed: Federation,
    rounds: int,
    files: dict[str, str] | None = None,
    *,
    client_fraction: float = 1.0,
    eval_splits: tuple[str, ...] = (),
):
    """The reference loop in one process over the same per-site rows (``ratings.csv``, or the
    site's file in ``files``) and split: the family, its final state and each step's metrics."""
    from fedrec.config import TrainingConfig
    from fedrec.sites.process import load_site_data
    from models.federation.loop import run_family
    from models.mf.family import ExplicitMF
    from models.sites.catalogue import item_set, site_client, union_catalogue

    config = TrainingConfig(
        sites=str(fed.coordinator / "sites.yaml"), factors=4, rounds=rounds, min_clients=2
    )
    options = {
        "user_col": "user_id",
        "item_col": "item_id",
        "rating_col": "rating",
        "timestamp_col": "timestamp",
        "rating_scale": (1.0, 5.0),
    }
    data = [
        load_site_data(str(fed.root / "sites" / n / (files or {}).get(n, "ratings.csv")), options)
        for n in SITES
    ]
    catalogue = union_catalogue(item_set(d) for d in data)
    clients = [
        site_client(
            d,
            catalogue,
            client_id=i,
            method=config.split,
            valid_fraction=config.valid_fraction,
            test_fraction=config.test_fraction,
        )
        for i, d in enumerate(data)
    ]
    family = ExplicitMF(config.mf_config())
    state, history = run_family(
        family,
        clients,
        len(catalogue),
        rounds=rounds,
        seed=config.seed,
        client_fraction=client_fraction,
        eval_splits=eval_splits,
    )
    return family, state, history


def _reference_state(fed: Federation, rounds: int, files: dict[str, str] | None = None):
    family, state, _ = _reference_run(fed, rounds, files)
    return family, state


def _files_holding(folders: list[Path], needles: list[bytes]) -> list[str]:
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {n[:12]!r}" for n in needles if n in data]
    return found


def test_sites_train_the_simulated_model_refuse_a_wrong_key_and_keep_their_rows(federation):
    from tasks.server import latest_checkpoint

    fed = federation
    # an impostor answers shop-a's requests with its own key, faster than shop-a does
    fed.start_site("shop-a", key="impostor", label="impostor", poll=0.05)
    # and shop-d, listed in the sites file, was never started: left out at enrolment, by name
    with_d = fed.coordinator / "sites-with-d.yaml"
    with_d.write_text(
        (fed.coordinator / "sites.yaml").read_text()
        + f"  - name: shop-d\n    public_key: {fed.keys}/impostor.pub\n    deadline_seconds: 5\n"
    )
    try:
        stderr = fed.root / "train-1.err"
        coordinator = fed.train("ws1", 3, stderr, sites=with_d.name)
        summary = _summary(coordinator, stderr)
    finally:
        fed.stop("impostor")
    log = stderr.read_text()
    assert summary["sites"]["enrolled"] == list(SITES)
    assert list(summary["sites"]["left_out"]) == ["shop-d"]
    assert summary["sites"]["left_out"]["shop-d"] == (
        "TimeoutError: shop-d: no answer to enroll within 5 s; its process never signed in on "
        "the Prefect API (not started, or started against another API)"
    ), summary["sites"]

    # (a) the model equals the in-process reference loop on the same partition
    family, expected = _reference_state(fed, rounds=3)
    got, progress = latest_checkpoint.fn(
        family=family, folder=summary["workspace"] + "/checkpoints"
    )
    assert progress.step == 3
    np.testing.assert_allclose(got.params.factors, expected.params.factors, rtol=0, atol=1e-8)
    np.testing.assert_allclose(got.params.bias, expected.params.bias, rtol=0, atol=1e-8)
    assert abs(got.params.global_mean - expected.params.global_mean) < 1e-8
    assert summary["metrics"]["system/clients"] == 3.0
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=fed.stores.mlflow_uri).get_run(summary["run_id"])
    assert run.info.run_name == "als-k4-3c-3r"  # named after the sites that enrolled
    assert run.data.tags["fedrec.sites_left_out"] == "shop-d"

    # (c) the impostor's answers were refused, each in one line naming the site and the reason
    refusals = [line for line in log.splitlines() if "shop-a: refused an answer" in line]
    assert refusals, log[-3000:]
    assert all("signature does not verify against key" in line for line in refusals)
    assert "answered" in fed.log("impostor")  # it did try

    # (b) no user id of any site on the coordinator's side: its folder (workspace, home), the
    # artifact store, the servers' folders and a dump of both databases
    users = [USER_BASE + 1000 * s + u for s in range(len(SITES)) for u in range(30)]
    needles = [str(u).encode() for u in users] + [np.int64(u).tobytes() for u in users]
    dumps = fed.root / "dumps"
    dumps.mkdir(exist_ok=True)
    for database in ("prefect", "mlflow"):
        subprocess.run(
            [
                str(postgres_bindir() / "pg_dump"),
                fed.stores.database_url(database),
                "-f",
                str(dumps / f"{database}.sql"),
            ],
            env=os.environ | {"PGPASSFILE": fed.stores.passfile},
            check=True,
            timeout=120,
        )
    assert (dumps / "prefect.sql").stat().st_size > 10_000  # the dump holds the runs
    assert "fedrec-answer" in (dumps / "prefect.sql").read_text()
    stores = Path(fed.stores.folder)
    searched = [fed.coordinator, dumps, stores / "artifacts", stores / "prefect"]
    assert _files_holding(searched, needles) == []
    # the search can fail: the sites' own folders do hold their users
    assert _files_holding([fed.root / "sites" / "shop-b"], needles[:90])


def test_a_sampled_sites_run_equals_the_reference_loop_and_its_resting_site_evaluates(
    federation,
):
    """Two of the three sites train each round; the one sitting a round out is sent an
    evaluation-only request for the model of the round before, so every round's validation
    figure is every site's, as in the reference loop that samples the same way."""
    from mlflow.tracking import MlflowClient

    from fedrec.config import TrainingConfig
    from models.federation.sampling import sample_clients
    from tasks.server import latest_checkpoint

    fed = federation
    rounds, fraction = 3, 0.5  # ceil(0.5 * 3) = 2 sites a round
    before = {name: len(fed.log(name)) for name in SITES}
    stderr = fed.root / "train-sampled.err"
    coordinator = fed.train("ws-sampled", rounds, stderr, "--client-fraction", str(fraction))
    summary = _summary(coordinator, stderr)

    family, expected, history = _reference_run(
        fed, rounds, client_fraction=fraction, eval_splits=("valid",)
    )
    got, progress = latest_checkpoint.fn(
        family=family, folder=summary["workspace"] + "/checkpoints"
    )
    assert progress.step == rounds
    np.testing.assert_allclose(got.params.factors, expected.params.factors, rtol=0, atol=1e-8)
    np.testing.assert_allclose(got.params.bias, expected.params.bias, rtol=0, atol=1e-8)
    client = MlflowClient(tracking_uri=fed.stores.mlflow_uri)
    for key in ("valid/rmse", "system/clients"):
        logged = {m.step: m.value for m in client.get_metric_history(summary["run_id"], key)}
        reference = {int(h["step"]): h[key] for h in history}
        assert logged.keys() == reference.keys(), (key, logged, reference)
        for step, value in reference.items():
            assert logged[step] == pytest.approx(value, rel=0, abs=1e-9), (key, step)
    assert {h["system/clients"] for h in history} == {2.0}

    # each round's resting site answered the evaluation of the round before, named after it;
    # a trained site's evaluation rode on its training request
    seed = TrainingConfig().seed
    for step in range(2, rounds + 1):
        chosen = set(sample_clients(len(SITES), fraction, seed, step).tolist())
        for index, name in enumerate(SITES):
            answered = f"answered evaluate round-{step - 1}" in fed.log(name)[before[name] :]
            assert answered == (index not in chosen), (step, name, chosen)
    for name in SITES:
        assert f"answered evaluate round-{rounds}" in fed.log(name)[before[name] :]


def test_an_interrupted_coordinator_names_a_site_never_started_and_does_not_wait_for_it(
    federation,
):
    """A site nobody started got no word for its whole deadline (600 s by default), and a
    coordinator stopped meanwhile went on waiting for it until then before it exited."""
    fed = federation
    silent = fed.coordinator / "sites-silent.yaml"
    silent.write_text(
        (fed.coordinator / "sites.yaml").read_text()
        + f"  - name: shop-d\n    public_key: {fed.keys}/impostor.pub\n    deadline_seconds: 600\n"
    )
    stderr = fed.root / "train-silent.err"
    coordinator = fed.train("ws-silent", 2, stderr, sites=silent.name, keep=False)
    try:
        _wait_for(
            lambda: (
                "shop-d: its process has not signed in on the Prefect API" in stderr.read_text()
            ),
            "the line naming the silent site",
            timeout=120,
        )
        started = time.monotonic()
        coordinator.send_signal(signal.SIGTERM)
        coordinator.wait(timeout=90)  # the old code waited out shop-d's 600 s
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
            coordinator.wait(timeout=30)
    log = stderr.read_text()
    assert coordinator.returncode == 1 and time.monotonic() - started < 60, log[-3000:]
    assert log.rstrip().endswith("fedrec: error: terminated (SIGTERM)"), log[-3000:]
    assert "removed the run's exchange files" in log


def test_a_site_without_ratings_is_left_out_of_a_rating_models_run_at_enrolment(federation):
    """A site whose file has no rating column read its rows as implicit feedback (every
    rating 1) without a word and answered an explicit run's rounds, whose validation RMSE then
    counted its constant 1s. It now says so when it starts, refuses the run at enrolment, and
    the run goes on under the quorum without it, naming it and why."""
    fed = federation
    folder = fed.root / "sites" / "shop-c"
    rows = (folder / "ratings.csv").read_text()
    (folder / "norating.csv").write_text(rows.replace("rating", "score", 1))
    fed.stop("shop-c")
    fed.start_site("shop-c", label="shop-c-norating", data="norating.csv")
    _wait_for(lambda: "polling" in fed.log("shop-c-norating"), "shop-c to start")
    assert "norating.csv has no rating column ('rating')" in fed.log("shop-c-norating")

    stderr = fed.root / "train-norating.err"
    summary = _summary(fed.train("ws-norating", 1, stderr, keep=False), stderr)
    assert summary["sites"]["enrolled"] == ["shop-a", "shop-b"]
    assert summary["sites"]["left_out"]["shop-c"] == (
        "SiteRefused: shop-c refused enroll: shop-c's data norating.csv has no rating "
        "column ('rating'): it holds implicit feedback, and this run trains a rating model "
        "(explicit feedback, ratings 1..5); allowed: a file with a rating column (fedrec site "
        "run --rating-col), or a run without ratings (fedrec train --feedback implicit "
        "--implicit-model neural)"
    )
    assert "answered train" not in fed.log("shop-c-norating")


ROUNDS_AFTER_RESTART = 8
ROUNDS_AFTER_RESTART = 8


def _wait_for(predicate, what: str, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_private_run_survives_a_killed_site_which_rejoins_after_a_restart(federation):
    fed = federation
    stderr = fed.root / "train-2.err"
    before = fed.log("shop-c").count("answered train round")
    # under DP each site noises its own answers from its own entropy and keeps them
    # rounds enough for the restarted process (its imports and accountant take 10-20 s on a
    # loaded machine) to be back before the last one
    coordinator = fed.train("ws2", ROUNDS_AFTER_RESTART, stderr, "--dp-epsilon", "8")
    _wait_for(
        lambda: fed.log("shop-c").count("answered train round") > before,
        "shop-c's first training answer of the run",
    )
    fed.stop("shop-c", signal.SIGKILL)  # mid-run, without warning
    _wait_for(lambda: "shop-c: no answer to train" in stderr.read_text(), "shop-c's deadline")
    fed.start_site("shop-c")  # same state folder: its replay record is reloaded
    summary = _summary(coordinator, stderr)
    log = stderr.read_text()

    steps = {
        int(r): int(c)
        for r, c in re.findall(rf"round (\d+)/{ROUNDS_AFTER_RESTART}.*?, (\d+) clients,", log)
    }
    left_out = [step for step, clients in steps.items() if clients == 2]
    assert left_out, log[-3000:]  # the quorum of 2 carried the rounds shop-c missed
    # the coordinator's warnings name the site, not its client number
    assert re.search(r"round \d+: train shop-c failed", log), log[-3000:]
    assert not re.search(r"client-\d+ (failed|did not answer)", log), log[-3000:]
    assert summary["metrics"]["system/clients"] == 3.0  # it answered the last round again
    # the summary and the run's tag say which rounds it missed, as the round lines count them
    from mlflow.tracking import MlflowClient

    missed = summary["sites"]["missed"]
    assert set(missed) == {"shop-c"}, missed
    assert {int(r) for r in re.findall(r"round (\d+) train", "; ".join(missed["shop-c"]))} == set(
        left_out
    ), (missed, steps)
    run = MlflowClient(tracking_uri=fed.stores.mlflow_uri).get_run(summary["run_id"])
    assert run.data.tags["fedrec.sites_missed"] == "shop-c: " + "; ".join(missed["shop-c"])
    assert 0 < summary["metrics"]["privacy/epsilon"] <= 8.0
    assert summary["model_version"]
    restarted = fed.log("shop-c").split("polling")[-1]
    assert "answered train round" in restarted
    for name in SITES:  # each site released its final evaluation itself
        assert f"answered evaluate round-{ROUNDS_AFTER_RESTART}" in fed.log(name)


def test_a_securely_aggregated_run_with_a_site_of_product_codes_equals_the_plain_model(
    federation,
):
    """Each site masks its own update and the coordinator unmasks only the sum. shop-c names
    its items by text codes, the others by numbers: the catalogue is text (a number matches its
    own text), and the model equals the reference loop on the same rows to 1e-8."""
    from tasks.server import latest_checkpoint

    fed = federation
    folder = fed.root / "sites" / "shop-c"
    rows = pd.read_csv(folder / "ratings.csv")
    rows.assign(item_id="sku-" + rows["item_id"].astype(str)).to_csv(
        folder / "products.csv", index=False
    )
    fed.stop("shop-c")
    fed.start_site("shop-c", label="shop-c-products", data="products.csv")
    labels = {"shop-a": "shop-a", "shop-b": "shop-b", "shop-c": "shop-c-products"}
    stderr = fed.root / "train-3.err"
    try:
        summary = _summary(fed.train("ws3", 3, stderr, "--secure-aggregation"), stderr)
    finally:
        fed.stop("shop-c-products")
        fed.start_site("shop-c")
    log = stderr.read_text()

    # each site masked its own update; the coordinator unmasked only the sum of the three
    assert log.count("securely aggregated the updates of 3 of 3 clients") == 4, log[-3000:]
    for label in labels.values():
        assert "answered secagg mask round 3" in fed.log(label)
        assert "answered secagg unmask round 3" in fed.log(label)
    items = pd.read_parquet(Path(summary["workspace"]) / "items.parquet")["item_id"].tolist()
    others = {
        str(i)
        for n in SITES[:2]
        for i in pd.read_csv(fed.root / "sites" / n / "ratings.csv")["item_id"]
    }
    assert items == sorted({f"sku-{i}" for i in rows["item_id"]} | others)  # sorted as text
    family, expected = _reference_state(fed, rounds=3, files={"shop-c": "products.csv"})
    got, progress = latest_checkpoint.fn(
        family=family, folder=summary["workspace"] + "/checkpoints"
    )
    assert progress.step == 3
    np.testing.assert_allclose(got.params.factors, expected.params.factors, rtol=0, atol=1e-8)
    np.testing.assert_allclose(got.params.bias, expected.params.bias, rtol=0, atol=1e-8)
    assert abs(got.params.global_mean - expected.params.global_mean) < 1e-8


def test_sites_that_answer_only_private_runs_count_their_masked_answers_at_the_full_noise(
    federation,
):
    from fedrec.sites.transport import Transport, alive_variable
    from models.sites.messages import ALIVE, check_alive, open_message
    from models.sites.registry import load_public_key

    fed = federation
    api = Transport(fed.stores.prefect_api, fed.stores.mlflow_uri)

    def sign(name: str) -> tuple[float, float, bool]:  # the site's sign of life, verified
        key = load_public_key(str(fed.keys / f"{name}.pub"), fed.keys)
        raw = api.get_variable(alive_variable(name))
        return check_alive(open_message(raw, key, ALIVE), name)

    for name in SITES:  # the private run above spent the sites' budget: fresh state folders,
        _wait_for(lambda n=name: "polling" in fed.log(n), f"{name} to start")
        fed.stop(name)  # the default (private runs only) and the peers' keys pinned
        assert sign(name)[2], name  # a stopped process says so: the coordinator waits no more
        fed.start_site(name, label=f"{name}-fresh", exact=False, peers=True)
    for name in SITES:
        _wait_for(lambda n=name: "polling" in fed.log(f"{n}-fresh"), f"{name} to start")
        _wait_for(lambda n=name: not sign(n)[2], f"{name}'s sign of life")
    api.close()
    entries = {n: fed.root / "state" / f"{n}-fresh" / "budget" / "entries.jsonl" for n in SITES}

    def charged() -> dict[str, str]:
        # a request of an earlier test's run that has not expired yet may be answered (and
        # charged) by a fresh site: the runs below are judged by what they add
        return {n: entries[n].read_text() if entries[n].exists() else "" for n in SITES}

    before = charged()

    exact = fed.train("ws-exact", 3, fed.root / "train-exact.err", "--secure-aggregation")
    out, _ = exact.communicate(timeout=600)
    assert exact.returncode == 2, (fed.root / "train-exact.err").read_text()[-3000:]
    error = json.loads(out.strip().splitlines()[-1])["error"]
    assert f"only private runs are answered by {', '.join(SITES)}" in error
    assert not (fed.coordinator / "ws-exact").exists()  # refused before the run started
    assert charged() == before

    # a private run without a published catalogue: the sites send no item ids, so none enrols
    flags = ("--secure-aggregation", "--dp-epsilon", "1")
    bare = fed.train("ws-bare", 3, fed.root / "train-bare.err", *flags)
    out, _ = bare.communicate(timeout=600)
    assert bare.returncode == 1, (fed.root / "train-bare.err").read_text()[-3000:]
    error = json.loads(out.strip().splitlines()[-1])["error"]
    assert "enrolment: 0 of 3 clients answered" in error
    assert "answers only private runs and sends no item ids: list the catalogue" in error
    assert charged() == before

    def exchanges() -> set[str]:  # the runs' exchange folders in the artifact store
        url = f"{fed.stores.mlflow_uri}/api/2.0/mlflow-artifacts/artifacts"
        listing = httpx.get(url, params={"path": "fedrec-sites"}, timeout=30).json()
        return {f["path"] for f in listing.get("files", [])}

    # a run whose epsilon the sites' users cannot spend (cap 10) is refused at enrolment,
    # before the noisy count is charged; without --keep-workspace its exchange files (the
    # catalogue it published, the sites' refusals) are removed from the store
    costly = ("--secure-aggregation", "--dp-epsilon", "12")
    err = fed.root / "train-costly.err"
    kept = exchanges()
    refused = fed.train("ws-costly", 3, err, *costly, sites="sites-catalogue.yaml", keep=False)
    out, _ = refused.communicate(timeout=600)
    assert refused.returncode == 1, err.read_text()[-3000:]
    error = json.loads(out.strip().splitlines()[-1])["error"]
    assert "enrolment: 0 of 3 clients answered" in error
    assert "this run asks epsilon 12" in error and "refused before anything" in error
    assert charged() == before
    assert "removed the run's exchange files fedrec-sites/" in err.read_text()
    assert exchanges() == kept

    stderr = fed.root / "train-4.err"
    summary = _summary(fed.train("ws4", 3, stderr, *flags, sites="sites-catalogue.yaml"), stderr)
    log = stderr.read_text()

    assert "securely aggregated the updates of 3 of 3 clients" in log, log[-3000:]
    assert "90 items in the catalogue" in log
    assert "the coordinator's catalogue lacks are left out" in fed.log("shop-c-fresh")
    # what the coordinator holds about each site: a noisy user count, no rows per split
    manifest = json.loads((Path(summary["workspace"]) / "manifest.json").read_text())
    assert all(c["n_users"] >= 1 and c["n_train"] is None for c in manifest["clients"])
    sigma = summary["metrics"]["privacy/noise_multiplier"]
    assert 0 < summary["metrics"]["privacy/epsilon"] <= 1.0 + 1e-9
    flow_run_id = summary["prefect_flow_run_url"].rstrip("/").rsplit("/", 1)[-1]
    for name in SITES:
        lines = [
            line
            for line in entries[name].read_text().splitlines()
            if json.loads(line)["run"] == flow_run_id
        ]
        releases = [json.loads(line)["release"] for line in lines]
        assert [r["kind"] for r in releases].count("count") == 1  # enrolment's noisy count
        training = [r for r in releases if r["kind"] not in ("evaluation", "count")]
        # one release per training round, each at the noise the masked sum carries (its own
        # share is sigma / sqrt(t), t = 3 here)
        assert len(training) == 3, lines
        assert all(r["noise_multiplier"] == pytest.approx(sigma, rel=1e-9) for r in training)
        # the coordinator calibrated at the delta each site counts a run at (a public number):
        # the site counts the run's releases as the run's epsilon, and its noisy count on top
        counted = [Release(**r) for r in releases if r["kind"] != "count"]
        assert 0.99 < run_epsilon(counted, SITE_RUN_DELTA) <= 1.0 + 1e-6, lines
    assert summary["metrics"]["privacy/delta"] == pytest.approx(SITE_RUN_DELTA)
