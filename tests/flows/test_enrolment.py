"""How a run over real sites starts from their enrolments (``flows.sites._enrol``): who takes
part, the catalogue, the manifest of counts, the MLflow run and its tags, and the runs refused
before anything is written.

The sites are stand-ins: a real :class:`~tasks.remote.SiteLink` over an in-memory transport whose
exchanges answer prepared enrolments (the signed exchange itself is tested in
``tests/unit/test_site_exchange.py``, and with site processes in ``tests/e2e/test_sites.py``).
The enrolment tasks run as Prefect task runs inside a flow, and the MLflow store is a real
SQLite one.
"""

from __future__ import annotations

import hashlib
import logging
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from prefect import flow
from prefect.runtime import flow_run

from fedrec.config import TrainingConfig
from models.data.partitions import ITEMS, read_manifest
from models.sites.catalogue import item_arrays
from models.sites.registry import Registry, SiteSpec
from tasks.secure import registry_folder
from tests.flows.helpers import flow_log, sites_file, tracking_store

NAMES = ("shop-c", "shop-b", "shop-a")  # client ids 0, 1, 2: not in the order of the names


def _exact(n_users: int, print_: str, **more: Any) -> dict[str, Any]:
    n_train = 8 * n_users
    return {"exact": True, "n_users": n_users, "n_train": n_train, "n_valid": n_users,
            "n_test": n_users, "fingerprint": print_, **more}  # fmt: skip


@pytest.fixture
def store(tmp_path, prefect_server):
    with tracking_store(tmp_path / "home") as store:
        (tmp_path / "sites.yaml").write_text("# read by the stand-in registry, not from here\n")
        store["sites"] = str(tmp_path / "sites.yaml")
        yield store


def _enrol(store, answers: dict[str, Any], catalogue=None, **fields: Any):
    """Enrol the sites of :data:`NAMES` whose exchanges answer ``answers[name]`` (items, info),
    or raise it when it is an exception; returns the run's context (or the error) and the
    requests the sites got."""
    from flows.sites import _enrol as enrol
    from tasks.remote import SiteLink
    from tests.sites_fakes import MemoryTransport

    sites = tuple(
        SiteSpec(name, i, Ed25519PrivateKey.generate().public_key()) for i, name in enumerate(NAMES)
    )
    registry = Registry(Ed25519PrivateKey.generate(), sites, catalogue=catalogue)
    config = TrainingConfig(
        sites=store["sites"], tracking_uri=store["uri"], round_timeout=60, **fields
    )
    requests: list[tuple[str, dict]] = []

    def exchange(site: SiteSpec, **request: Any):
        requests.append((site.name, request))
        answer = answers[site.name]
        if isinstance(answer, BaseException):
            raise answer
        items, info = answer
        return item_arrays(np.asarray(items, np.int64)), SimpleNamespace(info=info)

    @flow
    def enrolment():
        link = SiteLink(registry, MemoryTransport(), str(flow_run.get_id()), 0, {})
        link.exchange = exchange  # type: ignore[method-assign]
        try:
            return enrol(config, registry, link), link
        except Exception as err:  # the test looks at what was raised
            return err, link

    return (*enrolment(), requests)


def _runs(store) -> list:
    client = store["client"]
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_the_sites_that_enrol_make_the_catalogue_the_manifest_and_the_run(store):
    """One site fails to enrol: the others, a quorum, take part; the catalogue is the union of
    their item sets; the manifest holds their counts; the run is tagged with who is in and out."""
    answers = {
        "shop-a": ([7, 3, 5], _exact(4, "print-a")),
        "shop-b": ConnectionError("the site's server is down"),
        "shop-c": ([5, 11], _exact(6, "print-c")),
    }
    with flow_log(logging.INFO) as records:
        ctx, link, requests = _enrol(store, answers, min_clients=2)

    assert [e.client_id for e in ctx.entries] == [0, 2]
    np.testing.assert_array_equal(ctx.item_ids, [3, 5, 7, 11])
    assert link.n_items == 4 and link.catalogue is not None  # published for the rounds
    assert set(link.entries) == {0, 2}
    assert link.left_out == {"shop-b": "ConnectionError: the site's server is down"}
    entry = {e.client_id: e for e in ctx.entries}
    assert (entry[0].path, entry[0].n_users, entry[0].n_train) == ("site:shop-c", 6, 48)
    assert (entry[0].n_valid, entry[0].n_test) == (6, 6)
    manifest = ctx.manifest
    assert (manifest.n_users, manifest.n_items, manifest.source) == (10, 4, "sites:sites.yaml")
    # the sites' own keyed fingerprints, in the order of their names (not of sites.yaml), make
    # the run's
    expected = hashlib.sha256(b"shop-a:print-a\nshop-c:print-c").hexdigest()
    assert manifest.fingerprint == expected
    asked = sorted((name, r["kind"], r["phase"], r["epsilon"]) for name, r in requests)
    assert asked == [(name, "enroll", "exact", None) for name in sorted(NAMES)]  # all at once

    (run,) = _runs(store)
    assert run.info.run_id == ctx.run_id
    assert run.data.tags["fedrec.sites"] == "shop-c,shop-a"
    assert run.data.tags["fedrec.sites_left_out"] == "shop-b"
    assert run.data.tags["fedrec.sites_left_out_why"] == "shop-b: " + link.left_out["shop-b"]
    assert run.data.tags["fedrec.dataset_fingerprint"] == expected
    assert run.data.tags["fedrec.workspace"] == ctx.workspace
    assert "-2c-" in run.data.tags["mlflow.runName"]  # the sites that enrolled, not those asked
    # the workspace holds the counts and the item ids: no rows
    assert pd.read_parquet(f"{ctx.workspace}/{ITEMS}")["item_id"].tolist() == [3, 5, 7, 11]
    assert read_manifest(ctx.workspace) == manifest  # what the round loop reads back
    assert not registry_folder(ctx.workspace).exists()  # no keys: not a secure run
    messages = [r.getMessage() for r in records]
    assert any(
        m.startswith("2 of 3 sites enrolled (shop-c, shop-a), 4 items in the catalogue")
        for m in messages
    ), messages
    assert not any(m.startswith("privacy budget") for m in messages)


def test_a_published_catalogue_is_the_runs_and_a_site_that_leaves_rows_out_is_named(store):
    catalogue = np.array([2, 4, 6, 8, 10])
    answers = {
        "shop-a": ([], _exact(3, "a", outside_rows=7, outside_items=2)),
        "shop-b": ([], _exact(3, "b")),
        "shop-c": ([], _exact(3, "c", outside_rows=0, outside_items=0)),
    }
    with flow_log(logging.WARNING) as records:
        ctx, link, _ = _enrol(store, answers, catalogue=catalogue)

    np.testing.assert_array_equal(ctx.item_ids, catalogue)
    assert link.n_items == 5 and ctx.manifest.n_items == 5
    assert [r.getMessage() for r in records] == [
        "shop-a: 7 of its rows, of 2 items the published catalogue lacks, are left out of this run"
    ]
    assert "fedrec.sites_left_out" not in _runs(store)[0].data.tags


def test_a_private_run_takes_each_sites_noisy_number_of_users_and_nothing_else(store):
    """...and a securely aggregated one registers each site's key under its client id, which
    the server steps verify the sites' round keys with."""
    answers = {name: ([1, 2], {"n_users": 5 + i}) for i, name in enumerate(NAMES)}
    with flow_log(logging.INFO) as records:
        ctx, link, requests = _enrol(
            store, answers, dp_epsilon=4.0, dp_budget=8.0, secure_aggregation=True
        )

    assert [(e.client_id, e.n_users, e.n_train, e.n_valid, e.n_test) for e in ctx.entries] == [
        (0, 5, None, None, None), (1, 6, None, None, None), (2, 7, None, None, None)
    ]  # fmt: skip
    assert ctx.manifest.n_users == 18
    assert {(r["phase"], r["epsilon"]) for _, r in requests} == {("private", 4.0)}
    assert any(r.getMessage().startswith("privacy budget: the users' ids stay at the sites")
               for r in records)  # fmt: skip
    keys = sorted(p.name for p in registry_folder(ctx.workspace).iterdir())
    assert keys == ["client-0.pub", "client-1.pub", "client-2.pub"]
    registered = load_pem_public_key((registry_folder(ctx.workspace) / "client-2.pub").read_bytes())
    assert registered == link.registry.by_name("shop-a").public_key


@pytest.mark.parametrize(
    ("fields", "scale"),
    [
        ({}, (1.0, 5.0)),
        ({"rating_scale": "0.5,5"}, (0.5, 5.0)),
        ({"rating_scale": "data"}, "data"),
        ({"feedback": "implicit", "implicit_model": "neural"}, None),
    ],
    ids=["default", "given", "data", "neural"],
)
def test_an_enrolment_says_whether_the_run_trains_a_rating_model_and_on_what_scale(
    store, fields, scale
):
    """A site whose data has no ratings, or ratings on another scale, must be able to refuse a
    rating model's run at enrolment, before anything is trained: each enrolment request names
    the run's rating scale ("data" when the run takes it from the data), and a run without a
    rating model names none."""
    answers = {name: ([1, 2], _exact(3, name)) for name in NAMES}
    _, _, requests = _enrol(store, answers, **fields)

    assert [r["rating_scale"] for _, r in requests] == [scale] * len(NAMES)


@pytest.mark.parametrize("refusal", [{"exact": 0, "key_id": "k"}, {}], ids=["exact-0", "no-exact"])
def test_a_run_without_dp_that_a_site_would_not_answer_starts_nothing(store, refusal):
    """A site that answers only private runs enrols with ``exact`` 0 (or without it, which the
    enrolment task lets through with no counts): the run is refused in one line naming it,
    before any MLflow run, even with a quorum of other sites."""
    from flows.sites import SitesRefuseExact

    answers = {
        "shop-a": ([1], _exact(3, "a")),
        "shop-b": ([], refusal),
        "shop-c": ([3], _exact(3, "c")),
    }
    error, link, _ = _enrol(store, answers, min_clients=1)

    assert isinstance(error, SitesRefuseExact)
    assert str(error).startswith("only private runs are answered by shop-b: give --dp-epsilon")
    assert _runs(store) == [] and link.catalogue is None


def test_an_enrolment_short_of_its_quorum_starts_nothing_and_names_a_site_that_failed(store):
    from flows.rounds import QuorumError

    answers = {
        "shop-a": ([1], _exact(3, "a")),
        "shop-b": TimeoutError("no answer within 60 s"),
        "shop-c": ConnectionError("refused"),
    }
    error, link, _ = _enrol(store, answers, min_clients=2)

    assert isinstance(error, QuorumError)
    assert str(error) == (
        "enrolment: 1 of 3 clients answered, the quorum is 2 (min_clients=2, min_fraction=0.0); "
        "shop-c: ConnectionError: refused (and 1 more)"
    )
    assert _runs(store) == [] and link.catalogue is None


@pytest.mark.parametrize("keep", [False, True], ids=["pruned", "kept"])
def test_a_sites_run_that_fails_to_start_removes_its_exchange_files(store, monkeypatch, keep):
    """The exchange files (here the published catalogue) sit where every site can read them: a
    run that ends in enrolment takes them away, unless --keep-workspace keeps them."""
    import flows.sites
    from flows.rounds import QuorumError
    from tasks.remote import SiteLink
    from tests.sites_fakes import MemoryTransport

    folder = store["home"]
    (folder / "items.csv").write_text("item_id\n3\n5\n")
    sites = sites_file(folder, catalogue="items.csv")
    memory = MemoryTransport()
    monkeypatch.setattr(flows.sites, "Transport", lambda api, uri: memory)
    monkeypatch.setattr(flows.sites, "_servers", lambda config: ("http://api", "http://mlflow"))

    def down(self, site, **request):
        raise ConnectionError("the site's server is down")

    monkeypatch.setattr(SiteLink, "exchange", down)
    config = TrainingConfig(sites=sites, tracking_uri=store["uri"],
                            min_clients=1, round_timeout=60, keep_workspace=keep)  # fmt: skip

    published: list[str] = []
    monkeypatch.setattr(memory, "put_blob", _recording(memory.put_blob, published))

    @flow
    def sites_run():
        with pytest.raises(QuorumError, match=r"^enrolment: 0 of 1 clients answered"):
            flows.sites.start_sites_run(config)

    sites_run()
    (catalogue,) = published
    assert catalogue.endswith("/catalogue.npz")
    assert (catalogue in memory.blobs) is keep
    assert _runs(store) == []


def _recording(put_blob, paths: list[str]):
    def put(path: str, data: bytes):
        paths.append(path)
        return put_blob(path, data)

    return put


def test_an_ended_sites_run_removes_its_workspace_and_the_tag_naming_it(store):
    """A failed or interrupted run of sites kept its workspace "for --resume", which refuses a
    run of sites: the folder (catalogue, manifest, checkpoints) served nothing. The run's end
    removes it with its exchange files, whatever the outcome."""
    from pathlib import Path

    from flows.sites import prune_exchange

    answers = {"shop-a": ([1], _exact(3, "a")), "shop-b": ([2], _exact(3, "b")),
               "shop-c": ([3], _exact(3, "c"))}  # fmt: skip
    ctx, link, _ = _enrol(store, answers)
    workspace = Path(ctx.workspace)
    assert (workspace / ITEMS).is_file() and link.workspace == ctx.workspace
    assert _runs(store)[0].data.tags["fedrec.workspace"] == ctx.workspace

    flow(lambda: prune_exchange(link), name="ended")()

    assert not workspace.exists()
    assert "fedrec.workspace" not in _runs(store)[0].data.tags


def test_the_missed_steps_tag_keeps_8000_characters_and_marks_a_cut():
    """MLflow keeps 8,000 characters of a tag: a longer list of missed steps is cut to that,
    its end marked, and one that fits is kept whole."""
    from flows.sites import missed_text

    fits = {"shop-a": ["x" * (8000 - len("shop-a: "))]}
    assert missed_text(fits) == "shop-a: " + "x" * 7992
    one_more = {"shop-a": ["x" * 7993]}
    assert missed_text(one_more) == "shop-a: " + "x" * 7989 + "..."
    longer = {"shop-a": ["train round 1"] * 700, "shop-b": ["train round 2"]}
    full = "shop-a: " + "; ".join(["train round 1"] * 700) + "\nshop-b: train round 2"

    cut = missed_text(longer)

    assert len(cut) == 8000 and cut == full[:7997] + "..."
