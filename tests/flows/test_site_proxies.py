"""What a proxy task makes of a real site's answer: a plain update weighted by the site's weight,
a held update's receipt and nothing else, evaluation sums, an enrolment with the counts its kind
of run needs; what the enrolment and the key registry leave in the workspace; and how the run's
link submits them for the round loop (under the site's name, naming the asking runs).

The coordinator's side of the exchange is a stand-in that returns a prepared answer (the
exchange itself, signed and sealed, is tested in ``tests/unit/test_site_exchange.py`` and end to
end in ``tests/e2e/test_sites.py``); the tasks run as Prefect task runs inside a flow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prefect import flow
from prefect.utilities.annotations import quote

from models.data.partitions import ITEMS, MANIFEST, ClientEntry, Manifest, read_manifest
from models.protocol import ClientUpdate
from models.sites.catalogue import item_arrays
from models.sites.registry import SiteSpec
from models.sites.schema import SchemaError, wire_arrays
from tests.flows.helpers import sites_file

N_ITEMS = 8


@dataclass
class _Link:
    """The coordinator's side: every exchange answers ``arrays`` with ``info``, and the
    requests are kept."""

    arrays: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)
    n_items: int = N_ITEMS
    catalogue: Any = None
    requests: list[dict[str, Any]] = field(default_factory=list)

    def exchange(self, site: SiteSpec, **request: Any):
        self.requests.append(request)
        return self.arrays, SimpleNamespace(info=self.info)

    def secure_fields(self) -> dict[str, Any]:
        return {"registry": "the sites' keys"}


def _site(client_id: int = 3, weight: int = 1, name: str = "shop-a") -> SiteSpec:
    key = Ed25519PrivateKey.generate().public_key()
    return SiteSpec(name, client_id, key, weight=weight)


def _update(client_id: int = 3) -> ClientUpdate:
    """A plain ALS-style answer: three items, their rows and a summed array."""
    items, counts = np.array([1, 4, 6], np.int64), np.array([2, 1, 5], np.int64)
    rhs = np.arange(6, dtype=float).reshape(3, 2) + 0.5
    return ClientUpdate(client_id, items, counts, {"rhs": rhs}, {"train_n": 8.0})


def _receipt(client_id: int = 3, **changes: Any) -> ClientUpdate:
    """A held update's receipt (the length of its vector, nothing else), with ``changes``."""
    fields = {"items": np.zeros(0, np.int64), "counts": np.zeros(0, np.int64), "arrays": {},
              "metrics": {"held": 120.0}} | changes  # fmt: skip
    return ClientUpdate(
        client_id, fields["items"], fields["counts"], fields["arrays"], fields["metrics"]
    )


def _run(task, **kwargs):
    @flow
    def one_exchange():
        return task(**kwargs)

    return one_exchange()


EVALUATION = {"valid": ({"sse": 3.5, "n": 4.0}, None)}


@pytest.mark.parametrize("weight", [1, 3])
def test_a_plain_answer_comes_back_as_the_sites_update_counted_weight_times(prefect_server, weight):
    from tasks.remote import train_site

    sent = _update()
    link = _Link(wire_arrays(sent, EVALUATION))
    update, evaluations = _run(
        train_site, link=quote(link), site=_site(weight=weight), family=None, state=None,
        phase="als", round_=2, eval_splits=("valid",),
    )  # fmt: skip
    assert update.client_id == 3
    np.testing.assert_array_equal(update.items, [1, 4, 6])
    np.testing.assert_array_equal(update.counts, np.array([2, 1, 5]) * weight)
    np.testing.assert_array_equal(update.arrays["rhs"], sent.arrays["rhs"] * weight)
    assert update.metrics == {"train_n": 8.0}  # reported sums are not multiplied
    assert evaluations == {"valid": ({"sse": 3.5, "n": 4.0}, None)}
    (request,) = link.requests
    assert request["kind"] == "train" and request["phase"] == "als" and request["round_"] == 2
    assert request["eval_splits"] == ("valid",) and request["secure"] is None


def test_an_answer_for_another_client_is_refused(prefect_server):
    from tasks.remote import evaluate_site, train_site

    link = _Link(wire_arrays(_update(client_id=4), EVALUATION))
    with pytest.raises(SchemaError, match="answer is for client 4, expected 3"):
        _run(train_site, link=quote(link), site=_site(), family=None, state=None,
             phase="als", round_=1)  # fmt: skip
    with pytest.raises(SchemaError, match="answer is for client 4, expected 3"):
        _run(evaluate_site, link=quote(link), site=_site(), family=None, state=None,
             splits=("valid",))  # fmt: skip


def test_a_secure_answer_is_the_held_updates_receipt(prefect_server):
    from tasks.remote import train_site
    from tasks.secure import held_receipt

    link = _Link(wire_arrays(_receipt(), EVALUATION))
    receipt, evaluations = _run(
        train_site, link=quote(link), site=_site(), family=None, state=None, phase="als",
        round_=1, eval_splits=("valid",), secure=True,
    )  # fmt: skip
    assert receipt == held_receipt(120)
    assert evaluations == {"valid": ({"sse": 3.5, "n": 4.0}, None)}
    assert link.requests[0]["secure"] == {"registry": "the sites' keys"}


@pytest.mark.parametrize(
    "answer",
    [
        # the update itself instead of its receipt: it should have stayed on the site
        _update(),
        _receipt(items=np.array([2], np.int64), counts=np.array([1], np.int64)),
        _receipt(arrays={"rhs": np.zeros((0, 2))}),
        _receipt(metrics={"held": 120.0, "train_n": 8.0}),
        _receipt(metrics={"held": 0.0}),
        _receipt(metrics={}),
    ],
    ids=["update", "items", "array", "more-metrics", "empty", "no-size"],
)
def test_a_secure_answer_that_is_more_or_less_than_a_receipt_is_refused(prefect_server, answer):
    from tasks.remote import train_site

    link = _Link(wire_arrays(answer, {}))
    with pytest.raises(SchemaError, match="shop-a: a secure training answer must be a receipt"):
        _run(train_site, link=quote(link), site=_site(), family=None, state=None,
             phase="als", round_=1, secure=True)  # fmt: skip


def test_an_evaluation_answer_is_its_sums_and_names_its_release(prefect_server):
    from tasks.remote import evaluate_site

    recommended = np.array([0, 2, 0, 0, 1, 0, 0, 0])
    link = _Link(wire_arrays(_update(), {"valid": ({"ndcg": 1.5, "users": 3.0}, recommended)}))
    evaluations = _run(
        evaluate_site, link=quote(link), site=_site(), family=None, state=None,
        splits=("valid",), label="round-4",
    )  # fmt: skip
    sums, counts = evaluations["valid"]
    assert sums == {"ndcg": 1.5, "users": 3.0}
    np.testing.assert_array_equal(counts, recommended)
    (request,) = link.requests
    assert request["kind"] == "evaluate" and request["label"] == "round-4"
    assert request["eval_splits"] == ("valid",) and request["release"] is None


EXACT = {"exact": True, "n_users": 5, "n_train": 40, "n_valid": 5, "n_test": 5}


def test_an_enrolment_for_a_run_without_dp_gives_the_sites_items_and_counts(prefect_server):
    from tasks.remote import enroll_site

    link = _Link(item_arrays(np.array([7, 3, 7, 5])), EXACT)
    items, info = _run(enroll_site, link=quote(link), site=_site(), epsilon=None)
    np.testing.assert_array_equal(items, [3, 5, 7])
    assert info == EXACT
    (request,) = link.requests
    assert request["kind"] == "enroll" and request["phase"] == "exact"
    assert request["epsilon"] is None


@pytest.mark.parametrize("missing", ["n_users", "n_train", "n_valid", "n_test"])
def test_an_exact_enrolment_without_one_of_its_counts_is_refused(prefect_server, missing):
    from tasks.remote import enroll_site

    info = {k: v for k, v in EXACT.items() if k != missing}
    link = _Link(item_arrays(np.array([3])), info)
    with pytest.raises(SchemaError, match=rf"shop-a: enrolment lacks counts \['{missing}'\]"):
        _run(enroll_site, link=quote(link), site=_site(), epsilon=None)


def test_an_exact_enrolment_whose_count_is_not_a_whole_number_is_refused(prefect_server):
    from tasks.remote import enroll_site

    link = _Link(item_arrays(np.array([3])), EXACT | {"n_valid": 5.5})
    with pytest.raises(SchemaError, match=r"lacks counts \['n_valid'\]"):
        _run(enroll_site, link=quote(link), site=_site(), epsilon=None)


def test_a_private_enrolment_needs_only_the_noisy_number_of_users(prefect_server):
    from tasks.remote import enroll_site

    link = _Link(item_arrays(np.array([2, 1])), {"n_users": 6})
    items, info = _run(enroll_site, link=quote(link), site=_site(), epsilon=2.0)
    np.testing.assert_array_equal(items, [1, 2])
    assert info == {"n_users": 6}
    (request,) = link.requests
    assert request["phase"] == "private" and request["epsilon"] == 2.0

    without = _Link(item_arrays(np.array([2, 1])), {})
    with pytest.raises(SchemaError, match=r"lacks counts \['n_users'\]"):
        _run(enroll_site, link=quote(without), site=_site(), epsilon=2.0)


def test_a_private_only_site_asked_for_a_run_without_dp_sends_no_counts(prefect_server):
    """It answers without ``exact``: nothing is required here (the flow refuses the run)."""
    from tasks.remote import enroll_site

    link = _Link(item_arrays(np.array([4])), {})
    items, info = _run(enroll_site, link=quote(link), site=_site(), epsilon=None)
    np.testing.assert_array_equal(items, [4])
    assert info == {}


def test_item_ids_sent_though_the_catalogue_is_published_are_refused(prefect_server):
    from tasks.remote import enroll_site

    sent = _Link(item_arrays(np.array([3])), EXACT, catalogue="catalogue.npz")
    with pytest.raises(SchemaError, match="shop-a: sent item ids though the catalogue is pub"):
        _run(enroll_site, link=quote(sent), site=_site(), epsilon=None)
    none_sent = _Link(item_arrays(np.array([], np.int64)), EXACT, catalogue="catalogue.npz")
    items, _ = _run(enroll_site, link=quote(none_sent), site=_site(), epsilon=None)
    assert items.size == 0


def test_the_enrolment_record_holds_counts_and_item_ids_only(prefect_server, tmp_path):
    from tasks.remote import record_enrolment

    entries = [
        ClientEntry(0, "site-shop-a", 5, 40, 5, 5),
        ClientEntry(1, "site-b", 7, None, None, None),
    ]
    manifest = Manifest("f" * 64, "sites:sites.yaml", 3, 12, (1.0, 5.0), entries)
    workspace = tmp_path / "run"
    _run(
        record_enrolment, workspace=str(workspace), manifest=manifest, catalogue=np.array([3, 5, 7])
    )
    assert sorted(p.name for p in workspace.iterdir()) == sorted([ITEMS, MANIFEST])
    assert workspace.stat().st_mode & 0o777 == 0o700  # the key registry goes here too
    assert pd.read_parquet(workspace / ITEMS)["item_id"].tolist() == [3, 5, 7]
    assert read_manifest(workspace) == manifest  # what the round loop reads back


def test_the_key_registry_holds_each_sites_key_under_its_client_id(prefect_server, tmp_path):
    import os

    from models.privacy.identity import load_registry
    from tasks.remote import register_site_keys
    from tasks.secure import registry_folder

    sites = (_site(0, name="shop-a"), _site(2, name="shop-c"))
    workspace = tmp_path / "workspaces" / "run"
    before = os.umask(0)  # folders the umask would leave open to every user are made 0700
    try:
        _run(register_site_keys, workspace=str(workspace), sites=sites)
    finally:
        os.umask(before)
    folder = registry_folder(str(workspace))
    assert sorted(p.name for p in folder.iterdir()) == ["client-0.pub", "client-2.pub"]
    for site in sites:
        loaded = serialization.load_pem_public_key(
            (folder / f"client-{site.client_id}.pub").read_bytes()
        )
        assert loaded == site.public_key
    modes = {p: p.stat().st_mode & 0o777 for p in [*folder.iterdir(), folder, workspace]}
    assert set(modes.values()) <= {0o600, 0o700}, modes
    registry = load_registry(folder)  # what the server steps read: accepted as written
    assert {k: v.public_bytes_raw() for k, v in registry.items()} == {
        s.client_id: s.public_key.public_bytes_raw() for s in sites
    }


def _site_link(answer: dict[str, np.ndarray], site: SiteSpec):
    """A run's real :class:`SiteLink` over an in-memory transport, whose exchanges answer
    ``answer`` and are kept (``link.requests``)."""
    from models.sites.registry import Registry
    from tasks.remote import SiteLink
    from tests.sites_fakes import MemoryTransport

    registry = Registry(Ed25519PrivateKey.generate(), (site,))
    link = SiteLink(registry, MemoryTransport(), "run-1", 0, {}, n_items=N_ITEMS,
                    entries={site.client_id: site})  # fmt: skip
    stand_in = _Link(answer)
    link.exchange = stand_in.exchange  # type: ignore[method-assign]
    return link, stand_in.requests


def _task_run_name(task_run_id) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        return prefect.read_task_run(task_run_id).name


def test_the_round_loop_asks_a_site_through_its_link_under_the_sites_name(prefect_server):
    """The link submits the proxy tasks the round loop asks for: named after the site, a
    secure round asking for a receipt with every site's key, an evaluation labelled as the
    loop names it (its release's name when it is one)."""
    from prefect.runtime import flow_run

    from models.data.partitions import ClientEntry

    site = _site(0, name="shop-a")
    entry = ClientEntry(0, "site-shop-a", 5, None, None, None)
    secure, secure_requests = _site_link(wire_arrays(_receipt(client_id=0), {}), site)
    plain, plain_requests = _site_link(wire_arrays(_update(client_id=0), EVALUATION), site)

    @flow
    def a_round():  # one exchange at a time, so the requests come in this order
        asked = [
            lambda: secure.train(entry, "train client-0 round-2", None, None, retries={},
                                 phase="als", round_=2, secure_context=b"run-1 round 2"),
            lambda: plain.train(entry, "train client-0 round-2", None, None, retries={},
                                phase="als", round_=2),
            lambda: plain.evaluate(entry, "evaluate client-0 round-1", None, None, ("valid",),
                                   None, "round-1"),
            lambda: plain.evaluate(entry, "evaluate round-3 client-0", None, None, ("valid",),
                                   None, "round-3"),
        ]  # fmt: skip
        futures = []
        for ask in asked:
            futures.append(ask())
            futures[-1].wait()
        return [(f.result(), f.task_run_id) for f in futures], flow_run.get_id()

    answers, flow_run_id = a_round()  # the task runs are recorded once the flow run ends
    (receipt, kept_name), (update, sent_name), (_, looked_name), (_, released_name) = [
        (answer, _task_run_name(run_id)) for answer, run_id in answers
    ]
    assert (kept_name, sent_name) == ("train shop-a round-2", "train shop-a round-2")
    assert (looked_name, released_name) == ("evaluate shop-a round-1", "evaluate round-3 shop-a")
    assert isinstance(receipt[0], bytes) and secure_requests[0]["secure"] == secure.secure_fields()
    assert isinstance(update, tuple) and plain_requests[0]["secure"] is None
    assert [r["label"] for r in plain_requests[1:]] == ["round-1", "round-3"]
    # each request names the task run that asks (the site answers there) and its flow run
    asking = [(r["flow_run_id"], r["task_run_id"]) for r in secure_requests + plain_requests]
    assert asking == [(str(flow_run_id), str(run_id)) for _, run_id in answers]


def test_a_deployments_sites_run_without_servers_the_sites_reach_starts_nothing(
    prefect_server, tmp_path
):
    """The command line refuses a local store for ``--sites``; a deployment's run reaches the
    flow without it, and is refused there in one line, before any site is asked or any MLflow
    run starts."""
    import re

    from mlflow import MlflowClient
    from prefect.settings import get_current_settings

    from fedrec.config import TrainingConfig
    from flows.training import federated_training

    uri, api = f"sqlite:///{tmp_path / 'mlflow.db'}", get_current_settings().api.url
    config = TrainingConfig(sites=sites_file(tmp_path), tracking_uri=uri, min_clients=1,
                            round_timeout=5)  # a run that went on would not wait long  # fmt: skip
    with pytest.raises(ValueError, match=r"^--sites needs a Prefect server \(PREFECT_API_URL\) "
                       r"and an MLflow tracking server with the artifact proxy \(--tracking-uri "
                       rf"http://\.\.\.\); got '{re.escape(str(api))}' and '{re.escape(uri)}'$"):  # fmt: skip
        federated_training(**config.model_dump())
    client = MlflowClient(tracking_uri=uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_the_servers_of_a_sites_run_are_the_flows_api_and_its_tracking_server(prefect_server):
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from fedrec.config import TrainingConfig
    from flows.sites import _servers

    config = TrainingConfig(tracking_uri="http://127.0.0.1:5000")
    api = get_current_settings().api.url
    assert _servers(config) == (str(api), "http://127.0.0.1:5000")
    no_api = temporary_settings(updates={PREFECT_API_URL: None})
    with no_api, pytest.raises(ValueError, match=r"^--sites needs a Prefect server .* got None "):
        _servers(config)


@pytest.mark.parametrize(
    "fields", [{"dp_epsilon": 4.0, "dp_budget": 8.0}, {"secure_aggregation": True, "min_clients": 2}, {}],
    ids=["private", "secure", "plain"],
)  # fmt: skip
def test_a_deployments_run_of_weighted_sites_is_refused_when_private_or_secure(
    prefect_server, tmp_path, fields
):
    """Site weights multiply a site's update: a private or securely aggregated run refuses
    them before any site is asked; a plain run takes them (and goes on to need its servers)."""
    from fedrec.config import TrainingConfig
    from flows.training import federated_training
    from models.sites.registry import RegistryError

    sites = sites_file(tmp_path, weight=2)
    config = TrainingConfig(sites=sites, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                            round_timeout=5, **{"min_clients": 1, **fields})  # fmt: skip
    if fields:
        with pytest.raises(RegistryError, match=r"sites\.yaml: weight on shop-a: a weight"):
            federated_training(**config.model_dump())
    else:
        with pytest.raises(ValueError, match=r"^--sites needs a Prefect server"):
            federated_training(**config.model_dump())
