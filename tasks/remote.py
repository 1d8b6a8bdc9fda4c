"""Proxy tasks: one Prefect task run per site and exchange, waiting for a real site's answer.

A proxy task stands where a simulated client task stands in the round loop (same return
types as :func:`tasks.clients.train_client` and :func:`tasks.clients.evaluate_client`), so
quorum, deadlines and retries apply unchanged. It signs a request with the coordinator's key,
posts it as an artifact on its own task run (named after the site, e.g. ``train shop-a
round-3``), and polls that task run's answer artifacts. Each answer is verified against the
``sites.yaml`` key of the site it names, must answer exactly this request (run, kind, phase,
round, nonce, request digest), and its npz is size-capped, sha256-checked and schema-checked
before use. Anything else is refused with one warning line naming the site and the reason, and
the task keeps waiting until the site's deadline; a signed refusal by the site ends it at once.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run, task_run

from fedrec.sites.transport import REQUEST_TYPE, Transport, request_key
from models.data.partitions import ITEMS, MANIFEST, ClientEntry, Manifest
from models.federation.evaluation import Evaluation
from models.federation.family import Family
from models.privacy.released_metrics import MetricRelease
from models.protocol import ClientUpdate
from models.sites.encoding import decode_arrays, encode_arrays
from models.sites.messages import (
    ANSWER,
    REFUSAL,
    REQUEST,
    BlobRef,
    RefusedMessage,
    RoundAnswer,
    RoundRequest,
    body_digest,
    check_answer,
    check_refusal,
    open_message,
    sign_message,
)
from models.sites.registry import Registry, SiteSpec
from models.sites.schema import SchemaError, check_answer_arrays
from models.sites.spec import family_spec

POLL_SECONDS = 0.25  # how often a proxy task looks for its site's answer
DEFAULT_DEADLINE = 600.0
MAX_ANSWER_BYTES = 512 * 1024 * 1024
_ENROL_INFO = ("n_users", "n_train", "n_valid", "n_test")


class SiteRefused(RuntimeError):
    """The site sent a signed refusal of the request."""


@dataclass
class SiteLink:
    """The coordinator's side of one run's federation of sites: whom to ask, with which key,
    over which servers, and the run's shared references (catalogue, global states)."""

    registry: Registry
    transport: Transport
    run: str
    seed: int
    split: dict[str, Any]
    deadline: float | None = None  # the run's round timeout; a site's own deadline wins
    catalogue: BlobRef | None = None
    n_items: int = 0
    entries: dict[int, SiteSpec] = field(default_factory=dict)  # client id -> site
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _published: dict[int, tuple[Any, BlobRef]] = field(default_factory=dict, repr=False)

    def site_of(self, entry: ClientEntry) -> SiteSpec:
        return self.entries[entry.client_id]

    def deadline_of(self, site: SiteSpec) -> float:
        return site.deadline_seconds or self.deadline or DEFAULT_DEADLINE

    def publish_catalogue(self, items: np.ndarray) -> BlobRef:
        """Upload the catalogue's item ids once; every later request names it."""
        data = encode_arrays({"items": np.asarray(items, np.int64)})
        self.catalogue = self.transport.put_blob(f"{self._folder()}/catalogue.npz", data)
        self.n_items = len(items)
        return self.catalogue

    def publish_state(self, family: Family, state: Any) -> BlobRef:
        """Upload ``state`` once (content-addressed) however many sites are asked about it."""
        with self._lock:
            found = self._published.get(id(state))
            if found is not None and found[0] is state:
                return found[1]
            data = encode_arrays(family.state_arrays(state), precision=self.registry.precision)
            ref = BlobRef.of("", data)
            ref = self.transport.put_blob(f"{self._folder()}/state-{ref.sha256[:16]}.npz", data)
            if len(self._published) > 4:
                self._published.clear()
            self._published[id(state)] = (state, ref)  # holding it keeps its id unique
            return ref

    def _folder(self) -> str:
        return f"fedrec-sites/{self.run}"

    # ---- what the round loop submits ---------------------------------------------------

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
        """Submit the proxy of a client's training task (fault injection is simulation only)."""
        if secure_context is not None:
            raise ValueError("secure aggregation across real sites is not built yet")
        site = self.site_of(entry)
        return train_site.with_options(task_run_name=_named(name, entry, site), **retries).submit(
            link=self,
            site=site,
            family=family,
            state=state,
            phase=phase,
            round_=round_,
            eval_splits=eval_splits,
            devices=devices,
        )

    def evaluate(
        self,
        entry: ClientEntry,
        name: str,
        family: Family,
        state: Any,
        splits: tuple[str, ...],
        release: MetricRelease | None,
        release_name: str,
    ) -> PrefectFuture:
        """Submit the proxy of a client's evaluation task."""
        site = self.site_of(entry)
        return evaluate_site.with_options(task_run_name=_named(name, entry, site)).submit(
            link=self,
            site=site,
            family=family,
            state=state,
            splits=splits,
            release=release,
            label=release_name or name,
        )

    # ---- one exchange --------------------------------------------------------------------

    def exchange(
        self,
        site: SiteSpec,
        *,
        kind: str,
        phase: str = "",
        round_: int = 0,
        label: str = "",
        family: Family | None = None,
        state: Any = None,
        eval_splits: tuple[str, ...] = (),
        devices: float | None = None,
        release: MetricRelease | None = None,
    ) -> tuple[dict[str, np.ndarray], RoundAnswer]:
        """Ask ``site`` and wait for its verified answer: the answer's arrays and manifest.

        Raises
        ------
        SiteRefused
            If the site refused the request (signed).
        TimeoutError
            If no acceptable answer came before the site's deadline.
        """
        logger, now = get_run_logger(), time.time()
        deadline = self.deadline_of(site)
        nonce = secrets.token_hex(16)
        request = RoundRequest(
            run=self.run,
            kind=kind,
            phase=phase,
            round=round_,
            label=label,
            site=site.name,
            client_id=site.client_id,
            nonce=nonce,
            issued_at=now,
            expires_at=now + deadline,
            reply_to=f"{self._folder()}/{kind}-{phase or 'all'}-r{round_:04d}/{nonce}",
            seed=self.seed,
            split=self.split,
            family=family_spec(family) if family is not None else {},
            state=None if state is None else self.publish_state(family, state),
            catalogue=self.catalogue,
            eval_splits=tuple(eval_splits),
            devices=devices,
            release=None if release is None else asdict(release),
            flow_run_id=str(flow_run.get_id() or ""),
            task_run_id=str(task_run.get_id() or ""),
            precision=self.registry.precision,
        )
        # a retried task run holds its earlier attempts' answers: not answers to this request
        seen = {a.get("id") for a in self.transport.answers_on(request.task_run_id)}
        signed = sign_message(self.registry.coordinator_key, REQUEST, request.fields())
        digest = body_digest(signed["body"])
        self.transport.post_artifact(
            key=request_key(site.name),
            type_=REQUEST_TYPE,
            data=signed,
            task_run_id=request.task_run_id,
            flow_run_id=request.flow_run_id,
            description=f"{kind} {phase} round {round_} request to {site.name}",
        )
        while time.time() < now + deadline:
            for artifact in self.transport.answers_on(request.task_run_id):
                if artifact.get("id") in seen:
                    continue
                seen.add(artifact.get("id"))
                try:
                    return self._accept(site, request, digest, artifact.get("data"))
                except (RefusedMessage, SchemaError, ValueError) as err:  # keep waiting
                    logger.warning(
                        "%s: refused an answer to %s %s round %d: %s",
                        site.name,
                        kind,
                        phase,
                        round_,
                        err,
                    )
            time.sleep(POLL_SECONDS)
        raise TimeoutError(
            f"{site.name}: no answer to {kind} {phase} round {round_} within {deadline:.0f} s"
        )

    def _accept(
        self, site: SiteSpec, request: RoundRequest, digest: str, signed: Any
    ) -> tuple[dict[str, np.ndarray], RoundAnswer]:
        body = signed.get("body") if isinstance(signed, dict) else None
        if not isinstance(body, dict):
            raise RefusedMessage("the answer artifact holds no signed manifest")
        named = body.get("site")
        known = self.registry.by_name(named) if isinstance(named, str) else None
        if known is None:
            raise RefusedMessage(f"sent by unknown site {named!r} (not in sites.yaml)")
        if known.name != site.name:
            raise RefusedMessage(f"sent by site {known.name!r}, the request was to {site.name!r}")
        if body.get("purpose") == REFUSAL:
            reason = check_refusal(open_message(signed, site.public_key, REFUSAL), request)
            raise SiteRefused(f"{site.name} refused {request.kind} round {request.round}: {reason}")
        answer = check_answer(open_message(signed, site.public_key, ANSWER), request, digest)
        if not answer.answer.path.startswith(request.reply_to + "/"):
            raise RefusedMessage(f"answer stored outside its reply folder: {answer.answer.path}")
        raw = self.transport.get_blob(answer.answer, MAX_ANSWER_BYTES)
        return decode_arrays(raw, max_bytes=MAX_ANSWER_BYTES), answer


def _named(name: str, entry: ClientEntry, site: SiteSpec) -> str:
    """The round loop's task run name with the site's name for the client's."""
    return name.replace(f"client-{entry.client_id}", site.name)


@task(name="train-site", cache_policy=NONE)
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
) -> tuple[ClientUpdate, dict[str, Evaluation]]:
    """Ask a site to evaluate ``state`` and compute its update for ``phase``; wait for it."""
    arrays, _ = link.exchange(
        site,
        kind="train",
        phase=phase,
        round_=round_,
        family=family,
        state=state,
        eval_splits=eval_splits,
        devices=devices,
    )
    return check_answer_arrays(arrays, client_id=site.client_id, n_items=link.n_items)


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
    )
    return check_answer_arrays(arrays, client_id=site.client_id, n_items=link.n_items)[1]


@task(name="enroll-site", cache_policy=NONE)
def enroll_site(*, link: SiteLink, site: SiteSpec) -> tuple[np.ndarray, dict[str, Any]]:
    """Ask a site for its item-id set and its users and rows per split."""
    arrays, answer = link.exchange(site, kind="enroll", phase="enroll")
    items = arrays.get("items")
    if set(arrays) != {"items"} or items is None or items.dtype.kind not in "iu" or items.ndim != 1:
        raise SchemaError(f"{site.name}: enrolment must hold one 1-d integer array 'items'")
    missing = [k for k in _ENROL_INFO if not isinstance(answer.info.get(k), int)]
    if missing:
        raise SchemaError(f"{site.name}: enrolment lacks counts {missing}")
    return np.unique(items.astype(np.int64)), answer.info


@task(name="record-enrolment", cache_policy=NONE)
def record_enrolment(*, workspace: str, manifest: Manifest, catalogue: np.ndarray) -> None:
    """Write the run's manifest (per-site counts) and catalogue (item ids): no rows."""
    folder = Path(workspace)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"item_id": catalogue}).to_parquet(folder / ITEMS, index=False)
    (folder / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2, default=str))
