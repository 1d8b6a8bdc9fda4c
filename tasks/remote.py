"""Proxy tasks: one Prefect task run per site and exchange, waiting for a real site's answer.

A proxy task stands where a simulated client task stands in the round loop (same return
types as :func:`tasks.clients.train_client` and :func:`tasks.clients.evaluate_client`), so
quorum, deadlines and retries apply unchanged. Its run is named after the site (``train shop-a
round-3``); it makes one exchange with the site (:meth:`fedrec.sites.coordinator.Coordinator.
exchange`: a signed request posted on this task run, the site's verified answer) and checks the
answer's arrays against the client protocol (:func:`models.sites.schema.check_answer_arrays`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives import serialization
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run, task_run
from prefect.utilities.annotations import quote

from fedrec.sites.coordinator import Coordinator, RunStopped, SiteRefused
from models.data.partitions import ITEMS, MANIFEST, ClientEntry, Manifest
from models.federation.evaluation import Evaluation
from models.federation.family import Family
from models.files import make_private_folder, write_private
from models.privacy.released_metrics import MetricRelease
from models.protocol import ClientUpdate, weighted
from models.sites.catalogue import read_item_arrays
from models.sites.registry import SiteSpec
from models.sites.schema import SchemaError, check_answer_arrays
from tasks import retry_unless
from tasks.secure import held_receipt, read_round_config, registry_folder

_ROW_COUNTS = ("n_train", "n_valid", "n_test")  # sent by sites that answer runs without DP


class SiteLink(Coordinator):
    """A run's :class:`~fedrec.sites.coordinator.Coordinator` as the round loop uses it: the
    round loop's client tasks become proxy tasks of the sites.

    Proxy tasks receive the link ``quote``-d: Prefect would otherwise walk it for futures while
    other proxy tasks change its dictionaries (with 10 sites a round failed with "Failed to
    resolve inputs in parameter 'link'")."""

    # once the sites enrolled: the run's MLflow store, run id and workspace (which serves no
    # resume: a run of sites is trained again), for what the run's end removes
    tracking_uri: str | None = None
    tracking_run: str | None = None
    workspace: str | None = None

    def train(
        self,
        entry: ClientEntry,
        name: str,
        family: Family,
        state: Any,
        *,
        retries: Mapping[str, Any],
        phase: str,
        round_: int,
        eval_splits: tuple[str, ...] = (),
        secure_context: bytes | None = None,
        devices: float | None = None,
        **_simulation: Any,
    ) -> PrefectFuture:
        """Submit the proxy of a client's training task (fault injection is simulation only);
        under secure aggregation (``secure_context``) the site keeps its update and answers a
        receipt (the site binds it to the request's run and round)."""
        site = self.site_of(entry)
        return train_site.with_options(task_run_name=_named(name, entry, site), **retries).submit(
            link=quote(self),
            site=site,
            family=family,
            state=state,
            phase=phase,
            round_=round_,
            eval_splits=eval_splits,
            devices=devices,
            secure=secure_context is not None,
        )

    def secagg(
        self, entry: ClientEntry, name: str, *, step: str, config: bytes, message: bytes | None
    ) -> PrefectFuture:
        """Submit the proxy of a client's secure-aggregation ``step`` (:mod:`flows.secure`)."""
        site = self.site_of(entry)
        return secagg_site.with_options(task_run_name=_named(name, entry, site)).submit(
            link=quote(self), site=site, step=step, config=config, message=message
        )

    def evaluate(
        self,
        entry: ClientEntry,
        name: str,
        family: Family,
        state: Any,
        splits: tuple[str, ...],
        release: MetricRelease | None,
        label: str,
    ) -> PrefectFuture:
        """Submit the proxy of a client's evaluation task; ``label`` names what it evaluates
        (``round-3``, ``champion``: :attr:`~models.sites.messages.RoundRequest.label`)."""
        site = self.site_of(entry)
        return evaluate_site.with_options(task_run_name=_named(name, entry, site)).submit(
            link=quote(self),
            site=site,
            family=family,
            state=state,
            splits=splits,
            release=release,
            label=label,
        )


def _named(name: str, entry: ClientEntry, site: SiteSpec) -> str:
    """The round loop's task run name with the site's name for the client's."""
    return name.replace(f"client-{entry.client_id}", site.name)


def _asking() -> dict[str, Any]:
    """Who asks: this task run (and its flow run), and where refused answers are logged."""
    return {
        "flow_run_id": str(flow_run.get_id() or ""),
        "task_run_id": str(task_run.get_id() or ""),
        "warn": get_run_logger().warning,
    }


# A site that let its whole deadline pass is not asked again (a site that is down would cost
# the round another deadline per retry), nor one that refused (signed: it would refuse again),
# nor any once the run stopped waiting.
@task(
    name="train-site",
    cache_policy=NONE,
    retry_condition_fn=retry_unless(TimeoutError, SiteRefused, RunStopped),
)
def train_site(
    *,
    link: SiteLink,
    site: SiteSpec,
    family: Family,
    state: Any,
    phase: str,
    round_: int,
    eval_splits: tuple[str, ...] = (),
    devices: float | None = None,
    secure: bool = False,
) -> tuple[ClientUpdate | bytes, dict[str, Evaluation]]:
    """Ask a site to evaluate ``state`` and compute its update for ``phase``; wait for it.
    With ``secure`` the site keeps its update: the answer is the held update's receipt."""
    arrays, _ = link.exchange(
        site,
        kind="train",
        phase=phase,
        round_=round_,
        family=family,
        state=state,
        eval_splits=eval_splits,
        devices=devices,
        secure=link.secure_fields() if secure else None,
        **_asking(),
    )
    update, evaluations = check_answer_arrays(
        arrays, client_id=site.client_id, n_items=link.n_items
    )
    if not secure:
        return weighted(update, site.weight), evaluations
    size = update.metrics.get("held")
    if update.items.size or update.arrays or set(update.metrics) != {"held"} or not size:
        raise SchemaError(f"{site.name}: a secure training answer must be a receipt only")
    return held_receipt(int(size)), evaluations


@task(name="secagg-site", cache_policy=NONE)
def secagg_site(
    *, link: SiteLink, site: SiteSpec, step: str, config: bytes, message: bytes | None = None
) -> bytes:
    """Ask a site for its answer to one secure-aggregation step; wait for it."""
    return link.secure_step(site, step, read_round_config(config), message, **_asking())


@task(name="evaluate-site", cache_policy=NONE)
def evaluate_site(
    *,
    link: SiteLink,
    site: SiteSpec,
    family: Family,
    state: Any,
    splits: tuple[str, ...],
    release: MetricRelease | None = None,
    label: str = "",
) -> dict[str, Evaluation]:
    """Ask a site for its metric sums of ``state`` (a DP release when ``release`` is given)."""
    arrays, _ = link.exchange(
        site,
        kind="evaluate",
        label=label,
        family=family,
        state=state,
        eval_splits=splits,
        release=release,
        **_asking(),
    )
    return check_answer_arrays(arrays, client_id=site.client_id, n_items=link.n_items)[1]


@task(name="enroll-site", cache_policy=NONE)
def enroll_site(
    *,
    link: SiteLink,
    site: SiteSpec,
    epsilon: float | None,
    rating_scale: tuple[float, float] | str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Enrol a site in a run that will be private (DP at ``epsilon``) or not (None). A site
    that answers runs without DP (``exact`` in its answer) sends its users and rows per split,
    and its item-id set unless the catalogue is published. A site that answers only private
    runs sends, for a private run, only its number of users with noise; for a run without DP,
    nothing (the flow then refuses the run). A site whose users cannot spend ``epsilon`` more
    refuses a private run here, before it counts anything; so does a site whose data has no
    ratings, or ratings on another scale, when the run trains a rating model on
    ``rating_scale`` (``"data"``: the scale the data has)."""
    private = epsilon is not None
    phase = "private" if private else "exact"
    arrays, answer = link.exchange(
        site,
        kind="enroll",
        phase=phase,
        epsilon=epsilon,
        rating_scale=rating_scale,
        **_asking(),
    )
    items = read_item_arrays(arrays, f"{site.name}: enrolment")
    if link.catalogue is not None and items.size:
        raise SchemaError(f"{site.name}: sent item ids though the catalogue is published")
    counts: tuple[str, ...] = ()
    if answer.info.get("exact"):
        counts = ("n_users", *_ROW_COUNTS)
    elif private:
        counts = ("n_users",)
    missing = [k for k in counts if not isinstance(answer.info.get(k), int)]
    if missing:
        raise SchemaError(f"{site.name}: enrolment lacks counts {missing}")
    return np.unique(items), answer.info


@task(name="record-enrolment", cache_policy=NONE)
def record_enrolment(*, workspace: str, manifest: Manifest, catalogue: np.ndarray) -> None:
    """Write the run's manifest (per-site counts) and catalogue (item ids): no rows."""
    folder = Path(workspace)
    make_private_folder(folder)  # 0700 whatever the umask: the key registry goes here too
    pd.DataFrame({"item_id": catalogue}).to_parquet(folder / ITEMS, index=False)
    (folder / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2, default=str))


@task(name="register-site-keys", cache_policy=NONE)
def register_site_keys(*, workspace: str, sites: tuple[SiteSpec, ...]) -> None:
    """Write each site's ``sites.yaml`` key as the secure-aggregation registry the server steps
    verify round keys and survivor signatures against (``client-<id>.pub``), as files only
    this user may write, in folders no one else may write (:func:`models.files.write_private`)."""
    folder = registry_folder(workspace)
    for site in sites:
        pem = site.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        write_private(
            folder / f"client-{site.client_id}.pub", pem, "secure-aggregation key registry"
        )
