"""The site process: next to its data, outbound HTTP only, answering the coordinator's requests.

A site loads and validates its own rows once, with the same readers as ``fedrec train
--data``; a run of a rating model whose scale its rows do not have (no rating column, or
another ``--rating-scale``) it refuses at enrolment and in every request. It then lists the
request artifacts addressed to it on the Prefect API: at once when the API's events websocket
announces a new one (:meth:`Site.listen`), and every ``poll_seconds`` in any case (events
missed across a reconnect, a server without events). For each request it has not answered, it:

1. verifies the coordinator's signature with the pinned coordinator key, and the request's
   site, expiry and fields (:func:`models.sites.messages.check_request`);
2. rebuilds the family from the request's whitelisted parameters (:mod:`models.sites.spec`),
   downloads the catalogue and the global state (size cap, sha256 from the signed request,
   no pickles), checks the state against the family (:mod:`models.sites.schema`);
3. numbers and splits its rows against the catalogue (:func:`models.sites.catalogue.site_client`)
   and computes the answer with the family's own client functions: a private family's random
   streams (DP noise, users' sampling coins) come from this process's OS entropy;
4. keeps the answer on disk before sending it (:class:`models.sites.answers.SiteRecord`), uploads
   its npz and posts a signed answer manifest on the requesting task run, with a log line there;
   its own log line also names what the answer holds (arrays by name, dtype and shape, fields by
   name, never a value: :mod:`models.sites.contents`).

Asked again for an exchange it answered (a retry, a resumed run, a restart of this process) the
site sends the kept bytes; asked the same exchange about another global state, a private site
refuses (that would be a second release). A refused request is logged here in one line; when
the request is genuine, the refusal is also signed and posted so the coordinator stops waiting.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import signal
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.sites.budget import SiteBudget
from fedrec.sites.secure import SecureSite
from fedrec.sites.transport import (
    ANSWER_TYPE,
    NotFound,
    Transport,
    TransportError,
    alive_variable,
    answer_key,
    request_key,
)
from models.client import SPLIT, TEST, TRAIN, VALID, ClientData
from models.cohorts import family_cohort_round
from models.data.readers import TABLE_SUFFIXES, has_suffix, load_dataset
from models.data.schema import Interactions, keep_positives
from models.federation.evaluation import without_item_counts
from models.federation.family import Family
from models.federation.sampling import fresh_rng, round_rng
from models.files import check_private_folders
from models.mf.family import ExplicitMF
from models.privacy.identity import load_identity
from models.privacy.ledger import keyed_fingerprint, user_ids
from models.privacy.released_metrics import MetricRelease
from models.protocol import ClientUpdate
from models.sites.answers import SiteRecord
from models.sites.budget import (
    COUNT_NOISE,
    Release,
    count_release,
    evaluation_release,
    run_epsilon,
    training_release,
)
from models.sites.catalogue import (
    catalogue_key,
    check_sorted_ids,
    item_arrays,
    item_set,
    outside,
    read_item_arrays,
    site_client,
)
from models.sites.contents import describe_answer
from models.sites.encoding import EncodingError, decode_arrays, encode_arrays
from models.sites.messages import (
    ALIVE,
    ANSWER,
    CLOCK_SKEW,
    FROM_DATA,
    REFUSAL,
    REQUEST,
    UNVERIFIED,
    RefusedMessage,
    RoundRequest,
    alive_fields,
    answer_for,
    body_digest,
    canonical,
    check_request,
    key_id,
    open_message,
    refusal_fields,
    refusal_of_body,
    sign_message,
    unverified_fields,
)
from models.sites.registry import load_public_key, read_peers
from models.sites.schema import SchemaError, check_state, wire_arrays
from models.sites.sealing import parse_answer_key, seal_answer, sealing_context
from models.sites.spec import family_from_spec

MAX_BYTES = 512 * 1024 * 1024  # largest state or catalogue a site downloads
ALIVE_SECONDS = 30.0  # how often a site signs that its process is up
_EMPTY = np.zeros(0, np.int64)
_RUN_ID = re.compile(r"[0-9A-Za-z-]{0,64}")  # a Prefect run id (a UUID): nothing path-like
log = logging.getLogger("fedrec.site")


@dataclass(frozen=True)
class SiteOptions:
    """How a site runs: who it is, where its data is, whom it trusts and talks to."""

    name: str
    data: str
    prefect_api: str
    mlflow: str
    identity: Path
    coordinator_key: str
    state_dir: Path
    poll_seconds: float = 2.0
    events: bool = True  # wake up on the Prefect API's events websocket
    clock_skew: float = CLOCK_SKEW
    max_bytes: int = MAX_BYTES
    max_epsilon: float = 10.0  # no user of the site passes this, summed over runs
    max_delta: float | None = None  # the same for delta (None: DEFAULT_MAX_DELTA, public)
    peers: str | None = None  # a sites.yaml whose public keys this site pins for its peers
    allow_exact: bool = False  # also answer requests without DP (exact sums, counted nowhere)
    read_options: dict[str, Any] = field(default_factory=dict)


def load_site_data(spec: str, options: dict[str, Any]) -> Interactions:
    """The site's rows, read and validated as ``fedrec train --data`` reads them."""
    path = Path(spec)
    table = has_suffix(path, TABLE_SUFFIXES)
    return load_dataset(spec, **(options if table else {}))


class Site:
    """One site's process state: identity, pinned coordinator key, rows, replay record."""

    def __init__(self, options: SiteOptions, data: Interactions | None = None) -> None:
        self.options = options
        self.name = options.name
        self.key = load_identity(options.identity)
        # its secret, budget and kept answers go there: refused before anything is made in it
        check_private_folders(Path(options.state_dir), "site's state folder", is_folder=True)
        self.coordinator = load_public_key(options.coordinator_key, Path.cwd())
        self.data = data if data is not None else load_site_data(options.data, options.read_options)
        self.declared_scale = _declared_scale(options, self.data)
        self.record = SiteRecord(Path(options.state_dir) / "record")
        self.budget = SiteBudget(
            Path(options.state_dir) / "budget",
            user_ids(self.data),
            max_epsilon=options.max_epsilon,
            max_delta=options.max_delta,
        )
        peers = None if options.peers is None else read_peers(options.peers)
        self.secure = SecureSite(Path(options.state_dir) / "secagg", self.key, peers)
        self.transport = Transport(options.prefect_api, options.mlflow)
        self._seen: set[str] = set()  # artifact ids looked at by this process
        self._blobs: dict[str, dict[str, np.ndarray]] = {}  # by sha256: catalogue, states
        self._clients: dict[tuple, ClientData] = {}
        self._alive_lock = threading.Lock()
        self._stopped = False  # the stopped sign was posted

    def close(self) -> None:
        self.transport.close()

    # ---- the loop ------------------------------------------------------------------------

    def poll_once(self) -> None:
        """Handle every new request addressed to this site."""
        for artifact in reversed(self.transport.requests_for(self.name)):  # oldest first
            if artifact.get("id") in self._seen:
                continue
            try:
                self.handle(artifact)
            except TransportError:  # the servers failed: the next poll tries again
                raise
            except Exception:  # a fault of this process: logged, the site keeps serving
                log.exception("%s: failed on request %s", self.name, artifact.get("id"))
            self._seen.add(artifact.get("id"))

    def run(self, stop: threading.Event) -> None:
        """Answer requests until ``stop`` is set; a failing server is logged and retried."""
        # the accountant's first use loads dp-accounting (5 to 15 s on a busy machine): here,
        # not inside the deadline of the first private request
        run_epsilon([count_release()], self.budget.run_delta)
        wake = threading.Event()
        if self.options.events:
            threading.Thread(target=self.listen, args=(wake, stop), daemon=True).start()
        peers = self.secure.peers
        log.info(
            "%s: key %s, %d rows of %d users; answers %s; %s; users' cap epsilon %.3g; "
            "polling %s every %.1f s%s",
            self.name,
            key_id(self.key),
            len(self.data),
            self.data.n_users,
            "runs without DP too (--allow-exact)"
            if self.options.allow_exact
            else "private runs only",
            "peers' keys from the coordinator"
            if peers is None
            else f"{len(peers)} peer keys pinned",
            self.options.max_epsilon,
            self.options.prefect_api,
            self.options.poll_seconds,
            ", woken by its events" if self.options.events else "",
        )
        if self.data.rating_scale is None:
            log.warning(
                "%s: %s has no rating column (%r): its rows are implicit feedback, and it "
                "refuses runs of a rating model (explicit feedback)",
                self.name,
                self._file(),
                self.options.read_options.get("rating_col", "rating"),
            )
        threading.Thread(target=self._signs_of_life, args=(stop,), daemon=True).start()
        connected: bool | None = None  # not known before the first poll
        while not stop.is_set():
            connected = self._poll_reporting(connected)
            wake.wait(self.options.poll_seconds)
            wake.clear()
        self.sign_of_life(self.transport, stopped=True)
        log.info("%s: stopped", self.name)

    def sign_of_life(self, transport: Transport, *, stopped: bool = False) -> None:
        """Sign and post that this process is up (or has ``stopped``): a coordinator waiting
        for this site's answer stops waiting when the latest sign is stale or says stopped."""
        with self._alive_lock:  # once stopped is posted, no late sign of life overwrites it
            if self._stopped:
                return
            self._stopped = stopped
            fields = alive_fields(self.name, time.time(), ALIVE_SECONDS, stopped=stopped)
            signed = sign_message(self.key, ALIVE, fields)
            try:
                transport.put_variable(alive_variable(self.name), signed)
            except TransportError as err:  # the poll loop says when the servers are out of reach
                log.debug("%s: sign of life not posted: %s", self.name, err)

    def _signs_of_life(self, stop: threading.Event) -> None:
        """A sign of life now and every :data:`ALIVE_SECONDS`, on a connection of its own,
        so that a long computation of an answer does not read as a process that is down."""
        with Transport(self.options.prefect_api, self.options.mlflow) as transport:
            while not stop.is_set():
                self.sign_of_life(transport)
                stop.wait(ALIVE_SECONDS)

    def _poll_reporting(self, connected: bool | None) -> bool:
        """One poll; says when the site loses or regains the coordinator's servers (at start
        too, where a wrong --prefect-api shows), and returns whether the poll got through."""
        try:
            self.poll_once()
        except TransportError as err:
            if connected is not False:
                flag, url = ("--mlflow", self.options.mlflow) if err.mlflow else (
                    "--prefect-api", self.options.prefect_api)  # fmt: skip
                log.error(
                    "%s: not connected: %s; check %s %s (retrying every %.1f s)",
                    self.name, err, flag, url, self.options.poll_seconds,
                )  # fmt: skip
            else:
                log.warning("%s: %s", self.name, err)
            return False
        if not connected:
            log.info("%s: connected to %s", self.name, self.options.prefect_api)
        return True

    def listen(self, wake: threading.Event, stop: threading.Event) -> None:
        """Set ``wake`` whenever the Prefect API's events websocket announces a request artifact
        for this site (outbound websocket; the event's content is not trusted, it only says
        when to look). Reconnects after failures until ``stop`` is set."""
        os.environ["PREFECT_API_URL"] = self.options.prefect_api
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

        wanted = EventFilter(
            event=EventNameFilter(prefix=["prefect.artifact-collection."]),
            resource=EventResourceFilter(labels={"prefect.resource.name": request_key(self.name)}),
        )

        async def subscribe() -> None:
            async with get_events_subscriber(filter=wanted) as events:
                async for _ in events:
                    wake.set()
                    if stop.is_set():
                        return

        while not stop.is_set():
            try:
                asyncio.run(subscribe())
            except Exception as err:  # the poll goes on; say why the push stopped
                log.warning(
                    "%s: events websocket: %s; polling only, retrying in 10 s",
                    self.name,
                    " ".join(str(err).split())[:200],
                )
            stop.wait(10)

    # ---- one request ---------------------------------------------------------------------

    def handle(self, artifact: dict[str, Any]) -> None:
        """Verify, compute (or take the kept answer), upload and post; refusals are logged and
        posted (:meth:`_tell` for a request that did not verify or could not be read)."""
        started = time.perf_counter()
        signed = artifact.get("data") or {}
        try:
            body = open_message(signed, self.coordinator, REQUEST)
        except RefusedMessage as err:
            log.warning(
                "%s: refused request %s: %s (is --coordinator-key the coordinator's public key?)",
                self.name,
                artifact.get("id"),
                err,
            )
            if isinstance(signed, dict):  # a request to this site: tell its coordinator
                self._tell(artifact, unverified_fields(signed, str(err), self.coordinator))
            return
        try:
            request = check_request(
                body, site=self.name, now=time.time(), skew=self.options.clock_skew
            )
        except RefusedMessage as err:  # genuine but not answerable (e.g. expired): say so here
            # an expired request is the usual leftover of an earlier run: not worth a warning
            expired = "expired" in str(err)
            level = logging.DEBUG if expired else logging.WARNING
            log.log(level, "%s: refused request %s: %s", self.name, artifact.get("id"), err)
            if not expired:  # e.g. a field of another protocol version: the coordinator is told
                self._tell(artifact, refusal_of_body(body, str(err)))
            return
        if request.task_run_id != (artifact.get("task_run_id") or ""):
            log.warning(
                "%s: refused request %s: posted on another task run than it names",
                self.name,
                artifact.get("id"),
            )
            return
        if self.record.answered(request.nonce):
            return
        if self.transport.task_run_ended(request.task_run_id):
            # e.g. a request that outlived its deadline while this site was down: nobody reads
            # the answer, and a private one would spend the users' budget for nothing
            log.info(
                "%s: skipped request %s of run %s: the coordinator stopped waiting for it",
                self.name,
                artifact.get("id"),
                request.run,
            )
            return
        try:
            data, info = self._answer(request)
        except (RefusedMessage, SchemaError, ValueError) as err:
            public = public_reason(err)
            self._refuse(request, public, detail=str(err) if public != str(err) else "")
            return
        except NotFound as err:  # the store answered: the run's files are not there (any more)
            self._gone(artifact, request, err)
            return
        digest = body_digest(body)
        info = info | {"seconds": round(time.perf_counter() - started, 4)}
        # sealed to the run's coordinator: the store is readable by every site
        key = parse_answer_key(request.answer_key)
        sealed = seal_answer(data, info, key, sealing_context(request))
        ref = self.transport.put_blob(
            f"{request.reply_to}/{self.name}-{_short(sealed)}.sealed", sealed
        )
        answer = answer_for(request, digest, ref)
        self._post(request, sign_message(self.key, ANSWER, answer.fields()))
        self.record.mark_answered(request.nonce)
        self._log(
            request,
            f"{self.name} answered {_describe(request)} ({ref.bytes} bytes up)",
            # the seconds and what the answer holds are sealed to the coordinator: not on the API
            local=f"{info['seconds']:.2f} s; {_contents(data, info)}",
        )

    def _gone(self, artifact: dict[str, Any], request: RoundRequest, err: NotFound) -> None:
        """Say that a file of ``request``'s run is not in the artifact store: a run removes its
        exchange files when it ends, so a request still being fetched then finds them gone,
        which is no connection problem. Said at INFO when the request's task run has ended,
        else as a WARNING that also names the other cause, a --mlflow that is not the run's
        server. Nothing is posted: the request is not answered."""
        try:
            ended = self.transport.task_run_ended(request.task_run_id)
        except TransportError:
            ended = False
        log.log(
            logging.INFO if ended else logging.WARNING,
            "%s: skipped request %s of run %s: the run's files are gone (the run ended or was "
            "stopped)%s: %s",
            self.name,
            artifact.get("id"),
            request.run,
            "" if ended else f", or --mlflow {self.options.mlflow} is not the run's server",
            err,
        )

    def _refuse(self, request: RoundRequest, reason: str, detail: str = "") -> None:
        """Post a signed refusal with ``reason``; ``detail`` (the whole error, when ``reason``
        leaves some of it out: :func:`public_reason`) goes to the site's own log only."""
        log.warning(
            "%s: refused %s of run %s: %s",
            self.name,
            _describe(request),
            request.run,
            detail or reason,
        )
        self._post(request, sign_message(self.key, REFUSAL, refusal_fields(request, reason)))
        self.record.mark_answered(request.nonce)
        self._log(
            request,
            f"{self.name} refused {_describe(request)}: {reason}",
            level=logging.WARNING,
        )

    def _tell(self, artifact: dict[str, Any], fields: dict[str, Any] | None) -> None:
        """Post a refusal (or, for a request that did not verify, an ``unverified-request``
        notice) of a request this site could not read, so that its coordinator need not wait
        out the deadline. Nothing is posted about a request to another site, out of date, or
        whose task run has ended; the request is not marked answered (its nonce is not the
        site's to spend: a forged copy must not block the genuine request)."""
        data = artifact.get("data")
        body = data.get("body") if isinstance(data, dict) else None
        if fields is None or fields["site"] != self.name or not isinstance(body, dict):
            return
        task_run_id, flow_run_id = body.get("task_run_id"), body.get("flow_run_id")
        ids = (task_run_id, flow_run_id)
        if not task_run_id or not all(isinstance(i, str) and _RUN_ID.fullmatch(i) for i in ids):
            return  # unverified, and they go into API paths and fields
        expires = body.get("expires_at")
        if not isinstance(expires, int | float) or expires + self.options.clock_skew < time.time():
            return
        if artifact.get("task_run_id") != task_run_id:
            return
        purpose = UNVERIFIED if "request_sha256" in fields else REFUSAL
        try:
            if self.transport.task_run_ended(task_run_id):
                return
            self.transport.post_artifact(
                key=answer_key(self.name),
                type_=ANSWER_TYPE,
                data=sign_message(self.key, purpose, fields),
                task_run_id=task_run_id,
                flow_run_id=flow_run_id,
                description=f"{purpose} of round {fields['round']} from {self.name}",
            )
        except TransportError as err:  # a courtesy: the site goes on with the next request
            log.warning("%s: could not post the %s: %s", self.name, purpose, err)

    def _post(self, request: RoundRequest, signed: dict) -> None:
        self.transport.post_artifact(
            key=answer_key(self.name),
            type_=ANSWER_TYPE,
            data=signed,
            task_run_id=request.task_run_id,
            flow_run_id=request.flow_run_id,
            description=f"{request.name} from {self.name}",
        )

    def _log(
        self, request: RoundRequest, message: str, level: int = logging.INFO, local: str = ""
    ) -> None:
        """``message`` to the site's own log and the run's on the Prefect API; ``local`` (a
        detail the answer seals) to the site's own log only."""
        log.log(level, f"{message} ({local})" if local else message)
        try:
            self.transport.post_log(
                name=f"fedrec.site.{self.name}",
                message=message,
                level=level,
                flow_run_id=request.flow_run_id,
                task_run_id=request.task_run_id,
            )
        except TransportError as err:  # the answer is posted; a lost log line is no failure
            log.warning("%s: %s", self.name, err)

    # ---- computing an answer --------------------------------------------------------------

    def _answer(self, request: RoundRequest) -> tuple[bytes, dict[str, Any]]:
        """The answer's npz bytes and info: the kept answer if this exchange was answered."""
        if request.kind == "enroll":
            return self._enroll(request)
        if request.kind == "secagg":
            return self._secagg(request)
        family = family_from_spec(request.family)
        self._check_ratings(_family_scale(family))
        phases = [phase.name for phase in family.phases(1)]  # the names do not depend on rounds
        if request.kind == "train" and request.phase not in phases:
            raise RefusedMessage(
                f"phase {request.phase!r} is not one of the {family.name} family's "
                f"({', '.join(phases)}{', DP' if family.private else ''})"
            )
        state_sha = request.state.sha256 if request.state is not None else None
        kept = self.record.kept(request.record_key)
        if kept is not None and kept.state_sha256 == state_sha:
            return kept.data, kept.info
        if kept is not None and family.private:
            raise RefusedMessage(
                f"{request.name} was answered for another global state; a private site answers "
                "an exchange once"
            )
        pinned = self.secure.peers is not None
        release = _release(request, family, peers_pinned=pinned)
        if release is None and not self.options.allow_exact:
            raise RefusedMessage(
                f"{self.name} answers only private requests (DP): an exact {request.kind} answer "
                "would leave its users' budget uncounted (fedrec site run --allow-exact answers it)"
            )
        client = self._client(request)
        state = self._state(request, family, client.n_items)
        if release is not None:  # counted (and written down) before it is computed
            spent = self.budget.charge(request.run, release)
            self._log(  # what its users have spent: for the site's operator, not the API
                request,
                f"{self.name}: counted this {release.kind} release against its users' budget",
                local=f"this run has spent epsilon {spent.run_epsilon:.3g} of it; the most any "
                f"of them has spent is {spent.epsilon:.3g} of {self.options.max_epsilon:.3g}",
            )
        if request.kind == "train":
            update, evaluations = self._train(request, family, client, state)
            if request.secure is not None:  # the update stays here until it is masked
                size = self.secure.hold(request, family, update, client.n_items)
                update = ClientUpdate(
                    client.client_id, _EMPTY, _EMPTY, metrics={"held": float(size)}
                )
        else:
            update = ClientUpdate(client.client_id, _EMPTY, _EMPTY)
            evaluations = self._evaluate(request, family, client, state)
        arrays = wire_arrays(update, evaluations)
        data = encode_arrays(
            arrays,
            precision=request.precision,  # type: ignore[arg-type]
            compress=request.compress,
        )
        self.record.keep(request.record_key, state_sha, data)
        return data, {}

    def _secagg(self, request: RoundRequest) -> tuple[bytes, dict[str, Any]]:
        """One step of secure aggregation (:mod:`fedrec.sites.secure`), answered once: asked
        again with the same server message it sends the kept bytes, with another it refuses."""
        message_sha = request.message.sha256 if request.message is not None else None
        kept = self.record.kept(request.record_key)
        if kept is not None and kept.state_sha256 == message_sha:
            return kept.data, kept.info
        if kept is not None:
            raise RefusedMessage(
                f"secure step {request.phase} of round {request.round} was answered for another "
                "server message; a site answers each step once"
            )
        message = None
        if request.message is not None:
            message = self.transport.get_blob(request.message, self.options.max_bytes)
        reply = self.secure.answer(request, message)
        data = encode_arrays(
            {"message": np.frombuffer(reply, dtype=np.uint8)}, compress=request.compress
        )
        self.record.keep(request.record_key, message_sha, data)
        return data, {}

    def _enroll(self, request: RoundRequest) -> tuple[bytes, dict[str, Any]]:
        """What the coordinator's manifest holds about this site, answered once per run.

        A site that answers runs without DP (``--allow-exact``) sends its users and rows per
        split, and its item-id set unless the coordinator published the catalogue. A site that
        answers only private runs sends no item id (it needs the published catalogue) and only
        its number of users, with Gaussian noise of :data:`~models.sites.budget.COUNT_NOISE`
        from its own entropy, charged to its users' budget before it is drawn. A private run
        whose epsilon the site's users cannot spend is refused before that. Both send a
        fingerprint of the rows keyed with this site's secret (it changes when they change;
        nobody without the secret can test a guess of the rows against it), and whether the
        site answers requests without DP."""
        kept = self.record.kept(request.record_key)
        if kept is not None:  # a retried enrolment gets the same count, not a fresh draw
            return kept.data, kept.info
        exact = self.options.allow_exact
        if not exact and request.phase != "private":  # nothing for a run it will not answer
            info = {"exact": 0, "key_id": key_id(self.key)}
            return encode_arrays(item_arrays(np.empty(0, dtype=np.int64))), info
        self._check_ratings(request.rating_scale)  # a run it could not serve
        if request.phase == "private" and request.epsilon is not None:
            self.budget.check_run(request.run, request.epsilon)  # a run it could not finish
        lacking = rows = 0
        if request.catalogue is not None:
            catalogue = self._catalogue(request)
            items = np.empty(0, dtype=np.int64)
            lacking, rows = outside(self.data, catalogue)
            if rows:  # the coordinator is told only by a site that sends exact counts
                log.warning(
                    "%s: %d rows of %d items the coordinator's catalogue lacks are left out",
                    self.name,
                    rows,
                    lacking,
                )
        elif exact:
            catalogue = items = item_set(self.data)
        else:
            raise RefusedMessage(
                f"{self.name} answers only private runs and sends no item ids: list the "
                "catalogue in the coordinator's sites.yaml (catalogue: a CSV file with an "
                "item_id column)"
            )
        info: dict[str, Any] = {
            "fingerprint": keyed_fingerprint(self.data.fingerprint(), self.budget.secret),
            "exact": int(exact),
            "key_id": key_id(self.key),
        }
        if exact:
            client = self._split(request, catalogue)
            counts = np.bincount(client.frame[SPLIT].to_numpy(), minlength=3)
            info |= {
                "n_users": client.n_users,
                "n_train": int(counts[TRAIN]),
                "n_valid": int(counts[VALID]),
                "n_test": int(counts[TEST]),
                "outside_rows": rows,
                "outside_items": lacking,
            }
        else:  # counted (and written down) before it is drawn
            self.budget.charge(request.run, count_release())
            noise = fresh_rng().normal(0.0, COUNT_NOISE)
            info["n_users"] = max(1, round(self.data.n_users + noise))
        data = encode_arrays(item_arrays(items))
        self.record.keep(request.record_key, None, data, info)
        return data, info

    def _file(self) -> str:
        """The site's data file by its name (its folders are the site's own business)."""
        return Path(self.options.data or self.data.source).name

    def _check_ratings(self, scale: tuple[float, float] | str | None) -> None:
        """Refuse a run of a rating model on ``scale`` (``"data"``: the scale of its data;
        None: a run without ratings, which any data serves) when this site's data has no
        ratings, or ratings on another scale than the run's. Each reason names settings only
        (the site's, the run's), never a value of the rows: a site that takes its scale from
        its rows is refused by any run that gives one, whatever its rows hold.

        Raises
        ------
        RefusedMessage
        """
        if scale is None:
            return
        what = f"{self.name}'s data {self._file()}"
        if self.data.rating_scale is None:
            column = self.options.read_options.get("rating_col", "rating")
            run = "on the data's scale" if scale == FROM_DATA else _span(scale)
            raise RefusedMessage(
                f"{what} has no rating column ({column!r}): it holds implicit feedback, and "
                f"this run trains a rating model (explicit feedback, ratings {run}); allowed: "
                "a file with a rating column (fedrec site run --rating-col), or a run without "
                "ratings (fedrec train --feedback implicit --implicit-model neural)"
            )
        if scale == FROM_DATA:
            return
        low, high = scale
        run = _span(scale)
        if self.declared_scale is None:
            raise RefusedMessage(
                f"{what} takes its rating scale from its rows (fedrec site run --rating-scale "
                f"data), which cannot be checked against this run's {run} without telling "
                f"something of them; allowed: a site on the run's scale (--rating-scale "
                f"{low:g},{high:g}, its ratings within it)"
            )
        if self.declared_scale != (low, high):
            mine = _span(self.declared_scale)
            raise RefusedMessage(
                f"{what} is on the rating scale {mine} (fedrec site run --rating-scale) and "
                f"this run's is {run}; allowed: a site on the run's scale (--rating-scale "
                f"{low:g},{high:g}, its ratings within it), or a run on the site's (fedrec "
                f"train --rating-scale {self.declared_scale[0]:g},{self.declared_scale[1]:g})"
            )

    def _split(self, request: RoundRequest, catalogue: np.ndarray) -> ClientData:
        split = request.split
        cache = (catalogue_key(catalogue), request.client_id, canonical(split))
        if cache not in self._clients:
            self._clients.clear()  # one run at a time is the common case: keep one layout
            self._clients[cache] = site_client(
                # a site without a positive row has nothing to add (not a refusal that would
                # tell the coordinator its highest rating)
                keep_positives(self.data, split.get("positive_threshold"), empty_ok=True),
                catalogue,
                client_id=request.client_id,
                method=split["method"],
                valid_fraction=split["valid_fraction"],
                test_fraction=split["test_fraction"],
            )
        return self._clients[cache]

    def _download(self, ref: Any) -> dict[str, np.ndarray]:
        if ref.sha256 not in self._blobs:
            raw = self.transport.get_blob(ref, self.options.max_bytes)
            if len(self._blobs) > 8:
                self._blobs.clear()
            self._blobs[ref.sha256] = decode_arrays(raw, max_bytes=self.options.max_bytes)
        return self._blobs[ref.sha256]

    def _client(self, request: RoundRequest) -> ClientData:
        return self._split(request, self._catalogue(request))

    def _catalogue(self, request: RoundRequest) -> np.ndarray:
        arrays = self._download(request.catalogue)
        return check_sorted_ids(read_item_arrays(arrays, "catalogue"), "catalogue")

    def _state(self, request: RoundRequest, family: Family, n_items: int) -> Any:
        arrays = self._download(request.state)
        check_state(family, arrays, n_items)
        return family.load_state(arrays)

    def _train(
        self, request: RoundRequest, family: Family, client: ClientData, state: Any
    ) -> tuple[ClientUpdate, dict]:
        if request.devices is not None:
            update, evaluations = family_cohort_round(
                family,
                client,
                state,
                request.phase,
                request.seed,
                request.round,
                request.devices,
                request.eval_splits,
            )
        else:
            rng = round_rng(request.seed, request.round, client.client_id, private=family.private)
            update, evaluations = family.client_round(
                client, state, request.phase, rng, request.eval_splits
            )
        return update, (without_item_counts(evaluations) if family.private else evaluations)

    def _evaluate(
        self, request: RoundRequest, family: Family, client: ClientData, state: Any
    ) -> dict:
        evaluations = family.evaluate(client, state, request.eval_splits)
        if request.release is not None:  # a DP release: noise from this process's entropy
            try:
                release = MetricRelease(**request.release)  # type: ignore[arg-type]
            except (TypeError, ValueError) as err:
                raise RefusedMessage(f"release parameters: {err}") from err
            return release.publish(evaluations, fresh_rng())
        return without_item_counts(evaluations) if family.private else evaluations


def _declared_scale(options: SiteOptions, data: Interactions) -> tuple[float, float] | None:
    """The rating scale the site's operator gave (``--rating-scale``, or the one a MovieLens
    file has); None when the site reads its data without ratings, or takes the scale from its
    rows (``--rating-scale data``: then the scale is a value of the rows)."""
    if data.rating_scale is None:
        return None
    table = has_suffix(Path(options.data), TABLE_SUFFIXES)
    if table and "rating_scale" in options.read_options:
        given = options.read_options["rating_scale"]
        return None if given is None else (float(given[0]), float(given[1]))
    low, high = data.rating_scale
    return float(low), float(high)


def _family_scale(family: Family) -> tuple[float, float] | str | None:
    """The rating scale a family's requests train and score on: a rating model's (explicit
    feedback) clip range, ``"data"`` without one; None for a family without ratings."""
    if not isinstance(family, ExplicitMF):
        return None
    clip = family.config.clip_to
    return FROM_DATA if clip is None else (float(clip[0]), float(clip[1]))


def _span(scale: tuple[float, float]) -> str:
    return f"{scale[0]:g}..{scale[1]:g}"


def _release(request: RoundRequest, family: Family, *, peers_pinned: bool) -> Release | None:
    """The DP release an answer makes, as the site's own accountant counts it (None: not
    private). A masked answer counts the full noise only when the site pins its peers' keys:
    with keys taken from the coordinator, the coordinator could stand in for every peer, unmask
    this site's update alone and see only the site's own share of the noise."""
    if request.kind == "evaluate" and request.release is not None:
        try:
            release = MetricRelease(**request.release)  # type: ignore[arg-type]
        except (TypeError, ValueError) as err:
            raise RefusedMessage(f"release parameters: {err}") from err
        # the noise is scaled to the release's bounds: the family must apply those same bounds
        if getattr(family, "released", None) != release:
            raise RefusedMessage(
                f"the {family.name} family does not bound each user's evaluation sums as the "
                "release's noise assumes (its rows per user and error clip)"
            )
        return evaluation_release(release)
    dp = getattr(getattr(family, "config", None), "dp", None)
    if request.kind == "train" and family.private and dp is not None:
        if request.eval_splits:
            raise RefusedMessage(
                "a private training answer carries no evaluation sums (an uncounted release)"
            )
        # masked (the site holds its update and masks it only in a round of t >= its noise
        # shares) among pinned peers, the server learns a sum carrying the full noise
        masked = request.secure is not None and peers_pinned
        return training_release(dp, request.devices, masked=masked)
    if family.private:
        raise RefusedMessage(f"a private {request.kind} answer this site cannot account for")
    return None


def public_reason(err: ValueError) -> str:
    """What a refusal says on the Prefect API, which every reader there sees: a check of the
    request (:class:`RefusedMessage`, :class:`SchemaError`, :class:`EncodingError`: their
    messages name the request's fields or the coordinator's arrays) in its own words, the
    budget's public reason (no figure of what the site's users spent), and of any other error
    only its type. Its message may quote the site's data (a library's ``invalid literal for
    int(): 'u-4711'``, a count), so the whole of it goes to the site's own log."""
    if isinstance(err, RefusedMessage | SchemaError | EncodingError):
        return str(err)
    public = getattr(err, "public", None)
    if isinstance(public, str):
        return public
    return f"could not compute its answer ({type(err).__name__}: the site's own log says why)"


def _describe(request: RoundRequest) -> str:
    """What a request asks, for log lines: ``train round 3``, ``secagg mask round 3``,
    ``evaluate round-3``. A training request that first evaluates the global model (which is
    round - 1's: evaluation runs one round late) says so, in the round the coordinator's log
    reports those metrics under: ``train round 3 and evaluate round-2``."""
    if request.kind == "train" and request.eval_splits:
        return f"{request.name} and evaluate round-{request.round - 1}"
    return request.name


def _contents(data: bytes, info: dict[str, Any]) -> str:
    """What an answer holds, for the site's own log: its arrays' names, dtypes and shapes and
    its fields' names, read from the bytes it sends (:mod:`models.sites.contents`)."""
    try:
        return describe_answer(data, info)
    except (ValueError, zipfile.BadZipFile) as err:  # the answer is sent: only its line lacks it
        return f"contents not described: {err}"


def _short(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def run_site(options: SiteOptions) -> None:
    """Run a site until SIGTERM or SIGINT."""
    site = Site(options)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        site.run(stop)
    finally:
        site.close()
