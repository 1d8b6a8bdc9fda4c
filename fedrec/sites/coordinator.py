"""The coordinator's side of the exchanges with its sites, without Prefect.

:class:`Coordinator` holds one run's federation: the registry (sites, keys, deadlines), the
transport, the run's shared references (catalogue, global states, uploaded once and named by
content), and :meth:`Coordinator.exchange`: sign a request with the coordinator's key, post it
on the asking task run, then poll that task run's answers. Each answer is verified against the
``sites.yaml`` key of the site it names, must answer exactly this request (run, kind, phase,
round, nonce, request digest) from inside its reply folder, and its npz is size-capped,
sha256-checked, opened with the run's answer key (:mod:`models.sites.sealing`: the sites seal
their answers to it, so no one else who reads the artifact store can) and decoded without pickles; anything else is refused with one line naming the
site and the reason, and the wait goes on until the site's deadline. A signed refusal by the
site ends it at once. The Prefect proxy tasks (:mod:`tasks.remote`) call this.

However many exchanges wait at once, one :class:`AnswerCollector` thread looks for their
answers, in one Prefect API call per tick for all of them (a poll per waiting site would cost
the API hundreds of calls a second at a hundred sites).
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedrec.sites.secure import registry_field
from fedrec.sites.transport import (
    REQUEST_TYPE,
    Transport,
    TransportError,
    alive_variable,
    request_key,
)
from models.data.partitions import ClientEntry
from models.federation.family import Family
from models.privacy.released_metrics import MetricRelease
from models.privacy.secagg_plus import RoundConfig
from models.sites.catalogue import item_arrays
from models.sites.encoding import decode_arrays, encode_arrays
from models.sites.messages import (
    ALIVE,
    ANSWER,
    CLOCK_SKEW,
    REFUSAL,
    REQUEST,
    UNVERIFIED,
    BlobRef,
    RefusedMessage,
    RoundAnswer,
    RoundRequest,
    body_digest,
    check_alive,
    check_answer,
    check_info,
    check_refusal,
    check_unverified,
    key_id,
    manifest_digest,
    open_message,
    sign_message,
)
from models.sites.registry import Registry, SiteSpec
from models.sites.schema import SERVER_ONLY, SchemaError
from models.sites.sealing import answer_key_field, new_answer_key, open_answer, sealing_context
from models.sites.spec import family_spec

POLL_SECONDS = 0.25  # how often the coordinator looks for a site's answer
DEFAULT_DEADLINE = 600.0
LIVENESS_SECONDS = 15.0  # how often a waiting exchange reads the site's sign of life
WAIT_TICK = 1.0  # how often a waiting exchange looks at its answers and at the run's stop;
# the site's sign of life is first read after one tick, then every LIVENESS_SECONDS
MAX_ANSWER_BYTES = 512 * 1024 * 1024


class SiteRefused(RuntimeError):
    """The site sent a signed refusal of the request."""


class RunStopped(RuntimeError):
    """The run stopped waiting for its sites (:meth:`Coordinator.stop`): it failed, or was
    interrupted."""


class AnswerCollector:
    """One thread that finds the answers of every waiting exchange: each tick, one listing of
    the answer artifacts on all waiting task runs, each new answer handed to its waiter."""

    def __init__(self, transport: Transport, poll_seconds: float = POLL_SECONDS) -> None:
        self.transport, self.poll_seconds = transport, poll_seconds
        self._lock = threading.Lock()
        self._waiting: dict[str, queue.Queue] = {}
        self._seen: set[str] = set()
        self._thread: threading.Thread | None = None

    def watch(self, task_run_id: str) -> queue.Queue:
        """A queue that receives each new answer artifact posted on ``task_run_id`` from now
        on (answers already there, e.g. of an earlier attempt of the task run, are skipped)."""
        earlier = {a.get("id") for a in self.transport.answers_on(task_run_id)}
        found: queue.Queue = queue.Queue()
        with self._lock:
            self._seen |= earlier
            self._waiting[task_run_id] = found
            if self._thread is None:
                self._thread = threading.Thread(target=self._collect, daemon=True)
                self._thread.start()
        return found

    def forget(self, task_run_id: str) -> None:
        with self._lock:
            self._waiting.pop(task_run_id, None)

    def _collect(self) -> None:
        while True:
            with self._lock:
                waiting = list(self._waiting)
            try:
                found = self.transport.answers_on(*waiting) if waiting else []
            except TransportError:  # the waiters time out if the API stays away
                found = []
            for artifact in reversed(found):  # oldest first
                with self._lock:
                    if artifact.get("id") in self._seen:
                        continue
                    self._seen.add(artifact.get("id"))
                    target = self._waiting.get(artifact.get("task_run_id"))
                if target is not None:
                    target.put(artifact)
            time.sleep(self.poll_seconds)


@dataclass
class Coordinator:
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
    left_out: dict[str, str] = field(default_factory=dict)  # site -> why it did not enrol
    liveness_seconds: float = LIVENESS_SECONDS
    # the run's answer key (models.sites.sealing): in this process's memory only
    answer_secret: X25519PrivateKey = field(
        default_factory=new_answer_key, repr=False, compare=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _published: dict[int, tuple[Any, BlobRef]] = field(default_factory=dict, repr=False)
    _collector: AnswerCollector | None = field(default=None, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    _told_silent: set[str] = field(default_factory=set, repr=False)
    # per site: the time of the newest signed sign read (an older one read later is a replay),
    # of its newest sign of life (a sign not saying stopped, or the asking of a request it
    # answered), and the sign last read with when it was first read
    _newest_sign: dict[str, float] = field(default_factory=dict, repr=False)
    _alive_at: dict[str, float] = field(default_factory=dict, repr=False)
    _first_read: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)

    def stop(self) -> None:
        """End every waiting exchange within a tick (:class:`RunStopped`), and refuse new
        ones: the run is over, and its task runs' threads must not wait out their deadlines."""
        self._stopping.set()

    @property
    def collector(self) -> AnswerCollector:
        with self._lock:
            if self._collector is None:
                self._collector = AnswerCollector(self.transport)
            return self._collector

    def site_of(self, entry: ClientEntry) -> SiteSpec:
        return self.entries[entry.client_id]

    def deadline_of(self, site: SiteSpec) -> float:
        return site.deadline_seconds or self.deadline or DEFAULT_DEADLINE

    def publish_catalogue(self, items: np.ndarray) -> BlobRef:
        """Upload the catalogue's item ids once; every later request names it."""
        data = encode_arrays(item_arrays(items))
        self.catalogue = self.transport.put_blob(f"{self._folder()}/catalogue.npz", data)
        self.n_items = len(items)
        return self.catalogue

    def publish_state(self, family: Family, state: Any) -> BlobRef:
        """Upload ``state`` once (content-addressed) however many sites are asked about it."""
        with self._lock:
            found = self._published.get(id(state))
            if found is not None and found[0] is state:
                return found[1]
            arrays = family.state_arrays(state)
            data = encode_arrays(
                {name: value for name, value in arrays.items() if name not in SERVER_ONLY},
                precision=self.registry.precision,  # type: ignore[arg-type]
                compress=self.registry.compress,
            )
            ref = BlobRef.of("", data)
            ref = self.transport.put_blob(f"{self._folder()}/state-{ref.sha256[:16]}.npz", data)
            if len(self._published) > 4:
                self._published.clear()
            self._published[id(state)] = (state, ref)  # holding it keeps its id unique
            return ref

    def _folder(self) -> str:
        return f"fedrec-sites/{self.run}"

    def prune(self) -> str:
        """Delete the run's exchange files (catalogue, states, the sites' answers) from the
        artifact store, which every site can read; returns the folder.

        Raises
        ------
        TransportError
            If the store refused or could not be reached.
        """
        self.transport.delete_folder(self._folder())
        return self._folder()

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
        secure: dict[str, Any] | None = None,
        message: bytes | None = None,
        epsilon: float | None = None,
        rating_scale: tuple[float, float] | str | None = None,
        flow_run_id: str = "",
        task_run_id: str = "",
        warn: Callable[[str], None] = print,
    ) -> tuple[dict[str, np.ndarray], RoundAnswer]:
        """Ask ``site`` and wait for its verified answer: the answer's arrays and manifest.
        The request names the asking task run (answers and log lines go there); ``warn``
        gets one line per refused answer. ``secure`` and ``message`` make a secure-aggregation
        request (:mod:`fedrec.sites.secure`): the message is uploaded beside the reply folder.
        ``epsilon`` is a private enrolment's: the run's (:class:`RoundRequest`);
        ``rating_scale`` an enrolment's in a run of a rating model.

        Raises
        ------
        SiteRefused
            If the site refused the request (signed).
        TimeoutError
            If no acceptable answer came before the site's deadline, or the site's signed sign
            of life says its process is down.
        RunStopped
            If the run stopped waiting (:meth:`stop`).
        """
        if self._stopping.is_set():
            raise RunStopped(f"{site.name}: not asked: the run stopped waiting for its sites")
        now = time.time()
        deadline = self.deadline_of(site)
        nonce = secrets.token_hex(16)
        folder = f"{self._folder()}/{kind}-{phase or 'all'}-r{round_:04d}"
        sent = None
        if message is not None:
            sent = self.transport.put_blob(f"{folder}/{nonce}-message.npz", message)
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
            reply_to=f"{folder}/{nonce}",
            seed=self.seed,
            split=self.split,
            family=family_spec(family) if family is not None else {},
            state=None if state is None else self.publish_state(family, state),
            catalogue=self.catalogue,
            eval_splits=tuple(eval_splits),
            devices=devices,
            release=None if release is None else asdict(release),
            flow_run_id=flow_run_id,
            task_run_id=task_run_id,
            precision=self.registry.precision,
            compress=self.registry.compress,
            secure=secure,
            message=sent,
            epsilon=epsilon,
            answer_key=answer_key_field(self.answer_secret),
            rating_scale=rating_scale,
        )
        answers = self.collector.watch(request.task_run_id)
        signed = sign_message(self.registry.coordinator_key, REQUEST, request.fields())
        digest = body_digest(signed["body"])
        sent_sha = manifest_digest(signed)
        self.transport.post_artifact(
            key=request_key(site.name),
            type_=REQUEST_TYPE,
            data=signed,
            task_run_id=request.task_run_id,
            flow_run_id=request.flow_run_id,
            description=f"{request.name} request to {site.name}",
        )
        what = request.name
        refused = ""  # why the last answer that arrived was not taken
        look = now + WAIT_TICK  # when to read the site's sign of life next
        signed = True  # whether the site's process has signed in on the API (as far as known)
        try:
            while (left := now + deadline - time.time()) > 0:
                if self._stopping.is_set():
                    raise RunStopped(f"{site.name}: {what}: the run stopped waiting")
                try:
                    artifact = answers.get(timeout=min(left, WAIT_TICK))
                except queue.Empty:
                    if time.time() < look:
                        continue
                    look = time.time() + self.liveness_seconds
                    gone, signed = self.liveness(site, asked_at=now)
                    if gone is not None:
                        raise TimeoutError(f"{site.name}: no answer to {what}: {gone}") from None
                    if not signed and site.name not in self._told_silent:
                        self._told_silent.add(site.name)
                        warn(
                            f"{site.name}: its process has not signed in on the Prefect API: "
                            f"is `fedrec site run --name {site.name}` started there, with "
                            f"--prefect-api this run's API? waiting up to {deadline:.0f} s for "
                            f"its answer to {what} (deadline_seconds in the sites file, or "
                            "--round-timeout)"
                        )
                    continue
                try:
                    accepted = self._accept(site, request, digest, artifact.get("data"), sent_sha)
                except (RefusedMessage, SchemaError, ValueError) as err:  # keep waiting
                    refused = str(err)
                    warn(f"{site.name}: refused an answer to {what}: {err}")
                    continue
                with self._lock:  # it answered a request asked at `now`: it was up since then
                    self._alive_at[site.name] = max(now, self._alive_at.get(site.name, now))
                return accepted
        finally:
            self.collector.forget(request.task_run_id)
        hint = ""
        if refused:  # the likely cause of a signature that fails is the sites file's key
            cause = "signature does not verify" in refused
            why = ": is the site's public_key in the sites file its own?" if cause else ""
            hint = f"; the answer that came was refused ({refused}{why})"
        elif not signed:
            hint = "; its process never signed in on the Prefect API (not started, or started "
            hint += "against another API)"
        raise TimeoutError(f"{site.name}: no answer to {what} within {deadline:.0f} s{hint}")

    def gone(self, site: SiteSpec, asked_at: float | None = None) -> str | None:
        """Why ``site`` will not answer (:meth:`liveness`), or None."""
        return self.liveness(site, asked_at)[0]

    def liveness(self, site: SiteSpec, asked_at: float | None = None) -> tuple[str | None, bool]:
        """What ``site``'s latest signed sign of life says: why it will not answer, or None when
        it looks alive or says nothing verifiable (no sign yet, the API out of reach, a message
        another key signed, a sign older than one read before: a replay); the exchange then
        waits out its deadline. And whether the site's process has signed in at all (False
        only when no sign is there).

        The site is down when its process says it stopped after the request was asked
        (``asked_at``) and after every sign of life read since, or when its latest sign is older
        than three of its intervals plus :data:`CLOCK_SKEW`. A sign that says so and is older
        than the request (the stopped sign of a second process of the site that ended, a stale
        or stopped sign replayed on the API) is believed only once it has stood for one of the
        site's intervals and a look (:attr:`liveness_seconds`) since it was first read: a live
        process signs again within its interval, which replaces it."""
        try:
            raw = self.transport.get_variable(alive_variable(site.name))
        except TransportError:
            return None, True
        if not isinstance(raw, dict):
            return None, raw is not None
        try:
            at, every, stopped = check_alive(open_message(raw, site.public_key, ALIVE), site.name)
        except RefusedMessage:
            return None, True
        now = time.time()
        with self._lock:
            if at < self._newest_sign.get(site.name, at):
                return None, True
            self._newest_sign[site.name] = at
            signed_at, first_read = self._first_read.get(site.name, (None, now))
            if signed_at != at:
                first_read = now
                self._first_read[site.name] = (at, now)
            if not stopped:
                self._alive_at[site.name] = max(at, self._alive_at.get(site.name, at))
            alive_at = self._alive_at.get(site.name)
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
        if stopped:
            if alive_at is not None and at <= alive_at:  # it answered a request asked since
                return None, True
            why = f"its site process stopped at {when} (fedrec site run is not running there)"
            if asked_at is not None and at > asked_at:
                return why, True
        else:
            age = now - at
            if age <= 3 * every + CLOCK_SKEW:
                return None, True
            why = (
                f"its last sign of life was at {when}, {age:.0f} s ago (its process signs one "
                f"every {every:.0f} s): is the site's process down?"
            )
        if now - first_read >= every + self.liveness_seconds:
            return why, True
        return None, True

    def secure_fields(self, config: RoundConfig | None = None) -> dict[str, Any]:
        """The ``secure`` field of a request: every site's key from ``sites.yaml`` (what the
        sites verify each other's round keys against) and the protocol round, if any."""
        keys = {s.client_id: s.public_key for s in self.registry.sites}
        fields: dict[str, Any] = {"registry": registry_field(keys)}
        if config is not None:
            fields["round"] = config.to_json()
        return fields

    def secure_step(
        self, site: SiteSpec, step: str, config: RoundConfig, message: bytes | None, **asking: Any
    ) -> bytes:
        """One secure-aggregation step of ``site``: the server's message out, the site's
        protocol message back (bytes of a :mod:`models.privacy.secagg_plus` message).

        Raises
        ------
        SiteRefused, TimeoutError
            As :meth:`exchange`.
        SchemaError
            If the answer holds anything but one byte array ``message``.
        """
        arrays, _ = self.exchange(
            site,
            kind="secagg",
            phase=step,
            round_=config.round,
            secure=self.secure_fields(config),
            message=message,
            **asking,
        )
        reply = arrays.get("message")
        if (
            set(arrays) != {"message"}
            or reply is None
            or reply.dtype != np.uint8
            or reply.ndim != 1
        ):
            raise SchemaError(f"{site.name}: a secure step's answer must be one byte array")
        return reply.tobytes()

    def _accept(
        self, site: SiteSpec, request: RoundRequest, digest: str, signed: Any, sent_sha: str = ""
    ) -> tuple[dict[str, np.ndarray], RoundAnswer]:
        """The arrays and manifest of a verified answer to ``request`` (``digest``: its body's
        sha256; ``sent_sha``: the whole signed request's, which a site's notice that it could
        not verify the request must name).

        Raises
        ------
        SiteRefused
            For the site's signed refusal, or its notice about this very request.
        RefusedMessage, SchemaError, ValueError
            For anything else: the coordinator keeps waiting.
        """
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
            raise SiteRefused(f"{site.name} refused {request.name}: {reason}")
        if body.get("purpose") == UNVERIFIED:  # the site's key is right; its coordinator key not
            notice = open_message(signed, site.public_key, UNVERIFIED)
            reason, holds = check_unverified(notice, request, sent_sha)
            ours = key_id(self.registry.coordinator_key)
            hint = (
                f"it holds coordinator key {holds}, this coordinator signs with {ours}: is its "
                "--coordinator-key this coordinator's public key?"
                if holds != ours
                else "it holds this coordinator's key: is the site's fedrec the same version?"
            )
            raise SiteRefused(f"{site.name} could not verify {request.name}: {reason}; " + hint)
        answer = check_answer(open_message(signed, site.public_key, ANSWER), request, digest)
        if not answer.answer.path.startswith(request.reply_to + "/"):
            raise RefusedMessage(f"answer stored outside its reply folder: {answer.answer.path}")
        sealed = self.transport.get_blob(answer.answer, MAX_ANSWER_BYTES)
        raw, info = open_answer(sealed, self.answer_secret, sealing_context(request))
        answer = replace(answer, info=check_info(info))
        return decode_arrays(raw, max_bytes=MAX_ANSWER_BYTES), answer
