"""A whole exchange in memory: the coordinator asks, a site process answers, the coordinator
verifies; an impostor's answers are refused in one line each and a silent site times out."""

import base64
import io
import re
import threading
import time
import zipfile
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from fedrec.sites.coordinator import Coordinator, SiteRefused
from fedrec.sites.process import Site, SiteOptions
from fedrec.sites.transport import alive_variable
from models.data.schema import encode_interactions
from models.mf.family import ExplicitMF
from models.mf.federated import MFConfig
from models.neural.family import Neural, NeuralConfig
from models.privacy.identity import generate_identity, load_identity, public_bytes, save_identity
from models.sites.encoding import EncodingError, decode_arrays
from models.sites.messages import (
    ALIVE,
    CLOCK_SKEW,
    REQUEST,
    UNVERIFIED,
    RefusedMessage,
    alive_fields,
    key_id,
    sign_message,
)
from models.sites.registry import Registry, SiteSpec
from models.sites.schema import check_answer_arrays
from models.sites.sealing import open_answer, sealing_context
from tests.sites_fakes import MemoryTransport

FAMILY = ExplicitMF(MFConfig(n_factors=3, clip_to=(1.0, 5.0)))
SPLIT = {"method": "random", "valid_fraction": 0.2, "test_fraction": 0.2}
ITEMS = np.arange(100, 112)


@pytest.fixture
def world(tmp_path):
    transport, coordinator_key = MemoryTransport(), generate_identity()
    keys = {}
    for index, name in enumerate(("shop-a", "impostor")):
        keys[name] = generate_identity()
        save_identity(keys[name], tmp_path / name, index)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "user": np.repeat(np.arange(6), 5),
            "item": np.concatenate([rng.choice(ITEMS, 5, replace=False) for _ in range(6)]),
            "rating": rng.integers(1, 6, 30).astype(float),
        }
    )
    data = encode_interactions(frame, rating_scale=(1.0, 5.0), source="shop-a.csv")

    def site(key_name: str, coordinator_holds=None) -> Site:
        index = ("shop-a", "impostor").index(key_name)
        holds = coordinator_holds or coordinator_key
        options = SiteOptions(
            name="shop-a",
            data="",
            prefect_api="http://unused/api",
            mlflow="http://unused",
            identity=tmp_path / key_name / f"client-{index}.key",
            coordinator_key=base64.b64encode(public_bytes(holds)).decode(),
            state_dir=tmp_path / f"state-{key_name}",
            events=False,
            allow_exact=True,
        )
        process = Site(options, data=data)
        process.transport.close()
        process.transport = transport
        return process

    # A long deadline for the answers that must arrive, even on a loaded machine; the tests that
    # wait for a deadline to pass set a shorter one.
    spec = SiteSpec("shop-a", 0, keys["shop-a"].public_key(), deadline_seconds=60.0)
    coordinator = Coordinator(Registry(coordinator_key, (spec,)), transport, "run-1", 0, SPLIT)
    coordinator.publish_catalogue(ITEMS)
    return coordinator, spec, site


def _running(site: Site) -> threading.Event:
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            site.poll_once()
            stop.wait(0.02)

    threading.Thread(target=loop, daemon=True).start()
    return stop


def _ask(coordinator, spec, warnings, round_=1, family=FAMILY):
    state = family.initial_state(len(ITEMS), seed=0)
    return coordinator.exchange(
        spec,
        kind="train",
        phase="train",
        round_=round_,
        family=family,
        state=state,
        eval_splits=("valid",),
        task_run_id=f"t{round_}",
        warn=warnings.append,
    )


def test_the_coordinator_gets_the_site_answer_and_refuses_the_impostor(world):
    coordinator, spec, site = world
    warnings: list[str] = []
    stop = _running(site("impostor"))
    try:
        # the one line says what came and why it was not taken, with the likely cause
        timed_out = r"shop-a: no answer to train round 1 within 8 s; the answer that came was "
        hint = r"refused \(signature does not verify .*: is the site's public_key in the sites"
        with pytest.raises(TimeoutError, match=timed_out + hint):
            _ask(coordinator, replace(spec, deadline_seconds=8.0), warnings)
    finally:
        stop.set()
    # the impostor signs its sign of life with its own key, under its own name: shop-a's
    # process has not signed in, which a line says too
    silent = [w for w in warnings if "its process has not signed in" in w]
    assert (
        len(silent) == 1
        and len(warnings) > 1
        and all(
            w.startswith("shop-a: refused an answer to train round 1: signature does not verify")
            for w in warnings
            if w not in silent
        )
    )
    stop = _running(site("shop-a"))
    try:
        arrays, answer = _ask(coordinator, spec, warnings, round_=2)
    finally:
        stop.set()
    update, evaluations = check_answer_arrays(arrays, client_id=0, n_items=len(ITEMS))
    assert answer.round == 2 and update.items.size > 0 and "valid" in evaluations


def _read_as_another_site(transport, answer) -> dict | None:
    """The attack: another site, or anyone who can read the MLflow server, fetches a site's
    answer file from the shared artifact store; the arrays it holds, or None."""
    try:
        return decode_arrays(transport.blobs[answer.answer.path], max_bytes=10**8)
    except EncodingError:
        return None


def test_another_site_reading_the_store_cannot_read_a_sites_answer(world):
    """Every site (and every reader of the MLflow server) can read the artifact store, and an
    answer without DP holds the site's exact sums over its users. Plain npz answers (the weak
    version, which this test reads too) gave them away; sealed to the run's answer key, whose
    private half never leaves the coordinator's memory, they read as noise."""
    coordinator, spec, site = world
    stop = _running(site("shop-a"))
    try:
        arrays, answer = _ask(coordinator, spec, [])
    finally:
        stop.set()
    sent = coordinator.transport.blobs[answer.answer.path]
    plain, info = open_answer(sent, coordinator.answer_secret, sealing_context(answer))
    weak = SimpleNamespace(blobs={answer.answer.path: plain})
    stolen = _read_as_another_site(weak, answer)  # what the weak version gave away
    assert stolen is not None and np.array_equal(stolen["array.gram"], arrays["array.gram"])
    assert _read_as_another_site(coordinator.transport, answer) is None
    gram = arrays["array.gram"].tobytes()
    assert gram[:64] in plain and gram[:64] not in sent  # no stretch of the sums in the clear
    assert answer.info == info and "seconds" in info
    # nor does the manifest that anyone on the Prefect API reads carry the info
    (posted,) = [a for a in coordinator.transport.artifacts if a["type"] == "fedrec-answer"]
    assert posted["data"]["body"]["info"] == {}
    # a coordinator of another run (another answer key) cannot open it either
    other = Coordinator(coordinator.registry, coordinator.transport, "run-1", 0, SPLIT)
    with pytest.raises(RefusedMessage, match="does not open with this run's answer key"):
        open_answer(sent, other.answer_secret, sealing_context(answer))


def test_a_site_holding_another_coordinator_key_says_so_at_once(world):
    """A site started with the wrong --coordinator-key only logged that the requests did not
    verify; the coordinator waited out the whole deadline (600 s by default) per exchange. The
    site now signs a notice naming the manifest it got, and the coordinator stops at once."""
    coordinator, spec, site = world
    stranger = generate_identity()
    stop = _running(site("shop-a", coordinator_holds=stranger))
    try:
        with pytest.raises(SiteRefused) as refused:
            _ask(coordinator, spec, [])  # a 60 s deadline: a TimeoutError if nothing is said
    finally:
        stop.set()
    message = str(refused.value)
    assert message.startswith("shop-a could not verify train round 1: signature does not verify")
    theirs, ours = key_id(stranger), key_id(coordinator.registry.coordinator_key)
    assert f"it holds coordinator key {theirs}, this coordinator signs with {ours}" in message


def test_a_forged_copy_of_a_request_does_not_stop_the_coordinator_waiting(world):
    """The attack: anyone on the Prefect API sees a request and can post a copy with a bad
    signature. The site cannot verify the copy and says so, signed; were the coordinator to
    take that notice for its own request, the copy would drop the site from the round. The
    notice names the exact manifest the site got, the copy's, so the coordinator keeps waiting
    and the genuine request (whose nonce the copy did not use up) is answered."""
    coordinator, spec, site = world
    transport = coordinator.transport
    post = transport.post_artifact
    forger = generate_identity()

    def post_with_a_forged_copy_first(**artifact):
        if artifact["data"]["body"].get("purpose") == REQUEST:
            forged = sign_message(forger, REQUEST, {k: v for k, v in artifact["data"]["body"].items()
                                                    if k not in ("domain", "purpose")})  # fmt: skip
            post(**(artifact | {"data": forged}))
        post(**artifact)

    transport.post_artifact = post_with_a_forged_copy_first
    warnings: list[str] = []
    stop = _running(site("shop-a"))
    try:
        arrays, answer = _ask(coordinator, spec, warnings)
    finally:
        stop.set()
    assert answer.round == 1 and check_answer_arrays(arrays, client_id=0, n_items=len(ITEMS))
    notices = [a for a in transport.artifacts if a["data"]["body"]["purpose"] == UNVERIFIED]
    assert len(notices) == 1  # the site told about the copy
    assert warnings == [
        "shop-a: refused an answer to train round 1: a notice about another copy of the "
        "request than the one signed"
    ]


def test_the_coordinator_stops_waiting_for_a_site_whose_process_is_down(world, tmp_path):
    """A site that was down cost every exchange its whole deadline (600 s by default, each
    round again). A site's process signs a sign of life every 30 s, and says when it stops;
    the coordinator reads it while it waits, and believes only the site's own key. A sign
    already there when the request is asked is believed once it has stood for one of the
    site's intervals (1 s here) and a look."""
    coordinator, spec, _ = world
    coordinator.liveness_seconds = 0.2
    key = load_identity(tmp_path / "shop-a" / "client-0.key")
    variable = alive_variable("shop-a")
    patient = replace(spec, deadline_seconds=4.0)

    def wait(sign) -> str:
        coordinator.transport.variables[variable] = sign
        with pytest.raises(TimeoutError) as err:
            _ask(coordinator, patient, [])
        return str(err.value)

    # the weak version, what a site that never started (no sign at all) still gets: the whole
    # deadline, and the reason it is likely
    assert wait(None) == ("shop-a: no answer to train round 1 within 4 s; its process never "
                          "signed in on the Prefect API (not started, or started against "
                          "another API)")  # fmt: skip
    now = time.time()
    stale = sign_message(key, ALIVE, alive_fields("shop-a", now - 1000, 1.0))
    message = wait(stale)
    assert re.fullmatch(r"shop-a: no answer to train round 1: its last sign of life was at "
                        r"\S+ \S+ UTC, 10\d\d s ago \(its process signs one every 1 s\): is "
                        r"the site's process down\?", message), message  # fmt: skip
    stopped = sign_message(key, ALIVE, alive_fields("shop-a", now - 5, 1.0, stopped=True))
    assert "its site process stopped at" in wait(stopped)
    # a stale sign that another key signed (anyone can write the variable) is not believed,
    # nor is a fresh one taken for an answer
    forged = sign_message(generate_identity(), ALIVE, alive_fields("shop-a", now - 1000, 30.0))
    assert wait(forged).endswith("within 4 s")
    fresh = sign_message(key, ALIVE, alive_fields("shop-a", time.time(), 30.0))
    assert wait(fresh).endswith("within 4 s")


def test_a_stopped_site_fails_its_exchange_in_a_tick_and_a_silent_one_is_named_once(
    world, tmp_path
):
    """A site that stops while the coordinator waits fails its exchange at the first look
    (it ended after the first liveness interval, 15 s, every round again); a site that never
    started waited its deadline without a word."""
    coordinator, spec, _ = world
    key = load_identity(tmp_path / "shop-a" / "client-0.key")
    variable = alive_variable("shop-a")
    transport, post = coordinator.transport, coordinator.transport.post_artifact

    def post_then_stop(**artifact):  # the site's process ends once the request is out
        post(**artifact)
        transport.variables[variable] = sign_message(
            key, ALIVE, alive_fields("shop-a", time.time() + 0.01, 30.0, stopped=True)
        )

    transport.post_artifact = post_then_stop
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="its site process stopped at"):
        _ask(coordinator, replace(spec, deadline_seconds=60.0), [])
    assert time.monotonic() - started < 5

    transport.post_artifact = post
    del coordinator.transport.variables[variable]
    coordinator.liveness_seconds = 0.5
    warnings = []
    for round_ in (1, 2):
        with pytest.raises(TimeoutError):
            _ask(coordinator, replace(spec, deadline_seconds=2.0), warnings, round_=round_)
    assert warnings == [
        "shop-a: its process has not signed in on the Prefect API: is `fedrec site run --name "
        "shop-a` started there, with --prefect-api this run's API? waiting up to 2 s for its "
        "answer to train round 1 (deadline_seconds in the sites file, or --round-timeout)"
    ]


@pytest.mark.parametrize(
    "sign",
    [
        "another-process-stopped",  # a second `fedrec site run --name shop-a` that ended
        "replayed-stop",  # an old signed stopped notice posted again
        "replayed-stale",  # an old signed sign of life posted again
    ],
)
def test_an_old_sign_that_the_site_is_down_does_not_shut_a_live_site_out(world, tmp_path, sign):
    """A second process of a site that ended signed "stopped" a few seconds before a run
    asked, and the coordinator gave up on the live site at its first look (1 s), at enrolment
    for the whole run, though the site answered a second later; a replayed old sign did the
    same. A sign older than the request that says the site is down is now believed only once
    it has stood for one of the site's intervals: a live process replaces it by then."""
    coordinator, spec, site = world
    coordinator.liveness_seconds = 0.2
    key = load_identity(tmp_path / "shop-a" / "client-0.key")
    now = time.time()
    at, stopped = {
        "another-process-stopped": (now - 2, True),
        "replayed-stop": (now - 3600, True),
        "replayed-stale": (now - 3600, False),
    }[sign]
    coordinator.transport.variables[alive_variable("shop-a")] = sign_message(
        key, ALIVE, alive_fields("shop-a", at, 30.0, stopped=stopped)
    )
    process, stops = site("shop-a"), []
    late = threading.Timer(2.5, lambda: stops.append(_running(process)))  # after the first looks
    late.start()
    try:
        arrays, answer = _ask(coordinator, replace(spec, deadline_seconds=20.0), [])
    finally:
        late.cancel()
        for stop in stops:
            stop.set()
    assert answer.round == 1 and check_answer_arrays(arrays, client_id=0, n_items=len(ITEMS))


def test_a_stopped_run_ends_its_waiting_exchanges_in_a_tick_and_asks_no_more(world):
    """An interrupted coordinator waited for its silent sites' deadlines (600 s by default)
    before it could exit: its task runs' threads were still waiting."""
    from fedrec.sites.coordinator import RunStopped

    coordinator, spec, _ = world
    ended = {}

    def ask() -> None:
        started = time.monotonic()
        try:
            _ask(coordinator, replace(spec, deadline_seconds=600.0), [])
        except RunStopped as err:
            ended["after"], ended["why"] = time.monotonic() - started, str(err)

    waiting = threading.Thread(target=ask)
    waiting.start()
    posted = time.monotonic() + 30  # the request posted: the exchange is waiting for its answer
    while not coordinator.transport.requests_for("shop-a") and time.monotonic() < posted:
        time.sleep(0.01)
    coordinator.stop()
    waiting.join(timeout=10)
    assert not waiting.is_alive() and ended["after"] < 5
    assert ended["why"] == "shop-a: train round 1: the run stopped waiting"
    with pytest.raises(RunStopped, match="not asked: the run stopped waiting for its sites"):
        _ask(coordinator, spec, [], round_=2)


def test_a_running_site_signs_that_it_is_up_and_that_it_stopped(world):
    coordinator, spec, site = world
    process = site("shop-a")
    stop = threading.Event()
    stop.set()  # one pass: the first sign, the loop's end, the stopped sign
    asked = time.time() - 1  # a request asked before the process stopped
    threading.Thread(target=process.run, args=(stop,)).start()
    _wait(lambda: coordinator.gone(spec, asked) is not None)
    assert "its site process stopped at" in coordinator.gone(spec, asked)
    site("shop-a").sign_of_life(coordinator.transport)  # a restarted process
    assert coordinator.gone(spec, asked) is None


def _wait(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_pruning_removes_the_runs_exchange_files_and_nothing_else(world):
    coordinator, spec, site = world
    store = coordinator.transport.blobs
    store["fedrec-sites/run-10/catalogue.npz"] = b"another run's"
    stop = _running(site("shop-a"))
    try:
        _ask(coordinator, spec, [])
    finally:
        stop.set()
    ours = [name for name in store if name.startswith("fedrec-sites/run-1/")]
    assert any("/state-" in n for n in ours) and any("/train-" in n for n in ours)  # answers
    assert coordinator.prune() == "fedrec-sites/run-1"
    assert list(store) == ["fedrec-sites/run-10/catalogue.npz"]


def test_a_fedavg_site_sends_its_local_model_change(world):
    coordinator, spec, site = world
    fedavg = ExplicitMF(MFConfig(algorithm="fedavg", n_factors=3, local_epochs=2))
    stop = _running(site("shop-a"))
    try:
        arrays, _ = _ask(coordinator, spec, [], family=fedavg)
    finally:
        stop.set()
    update, _ = check_answer_arrays(arrays, client_id=0, n_items=len(ITEMS))
    assert set(update.arrays) == {"delta"} and np.abs(update.arrays["delta"]).sum() > 0


def test_a_neural_site_sends_its_network_change_and_item_counts(world):
    coordinator, spec, site = world
    neural = Neural(NeuralConfig(hidden=(4,), latent=2))
    stop = _running(site("shop-a"))
    try:
        arrays, _ = _ask(coordinator, spec, [], family=neural)
    finally:
        stop.set()
    update, evaluations = check_answer_arrays(arrays, client_id=0, n_items=len(ITEMS))
    assert set(update.arrays) == {"network_delta"} and update.metrics["users"] > 0
    assert "valid" in evaluations


def test_a_float32_deflated_exchange_packs_both_directions(world):
    coordinator, spec, site = world
    coordinator.registry = replace(coordinator.registry, precision="float32", compress=True)
    stop = _running(site("shop-a"))
    try:
        arrays, answer = _ask(coordinator, spec, [])
    finally:
        stop.set()
    sealed = coordinator.transport.blobs[answer.answer.path]
    sent, _ = open_answer(sealed, coordinator.answer_secret, sealing_context(answer))
    states = [coordinator.transport.blobs[p] for p in coordinator.transport.blobs if "state-" in p]
    for data in (sent, *states):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    update, _ = check_answer_arrays(arrays, client_id=0, n_items=len(ITEMS))
    assert update.arrays["gram"].dtype == np.float64  # widened back on reading


@pytest.mark.parametrize("ended", [True, False], ids=["task-run-ended", "task-run-running"])
def test_a_request_whose_run_removed_its_files_is_not_a_connection_error(world, caplog, ended):
    """A run that ends removes its exchange files; a site still fetching a request's state then
    got HTTP 404 and logged an ERROR "not connected ...; check --mlflow", though the network
    was fine. It now says the run's files are gone, at INFO once the request's task run has
    ended (as a WARNING naming --mlflow too while it runs), skips the request and stays
    connected."""
    import logging

    coordinator, spec, site = world
    process = site("shop-a")

    def ask() -> None:
        with pytest.raises(TimeoutError):
            _ask(coordinator, replace(spec, deadline_seconds=3.0), [])

    asking = threading.Thread(target=ask)
    asking.start()
    _wait(lambda: any(a["type"] == "fedrec-request" for a in coordinator.transport.artifacts))
    coordinator.prune()  # the run ended: its catalogue and states are gone
    # the site looked at the task run before it ended, and again after the download failed
    looks = iter([False, ended])
    coordinator.transport.task_run_ended = lambda task_run_id: next(looks, ended)
    with caplog.at_level(logging.INFO, logger="fedrec.site"):
        assert process._poll_reporting(True) is True  # still connected
    asking.join(timeout=30)
    records = [r for r in caplog.records if r.name == "fedrec.site"]
    assert [r.levelname for r in records] == ["INFO" if ended else "WARNING"]
    message = records[0].getMessage()
    assert "the run's files are gone (the run ended or was stopped)" in message
    assert "not connected" not in message and ("--mlflow" in message) is not ended
    assert not any(a["type"] == "fedrec-answer" for a in coordinator.transport.artifacts)
    process.poll_once()  # the request is not fetched again
    assert len([r for r in caplog.records if r.name == "fedrec.site"]) == 1


@pytest.mark.parametrize(
    ("asked", "named"),
    [
        ({"kind": "evaluate", "label": "round-8"}, "evaluate round-8"),
        ({"kind": "evaluate", "label": "champion"}, "evaluate champion"),
        ({"kind": "enroll", "phase": "exact"}, "enroll"),
        ({"kind": "train", "phase": "train", "round_": 3}, "train round 3"),
        ({"kind": "secagg", "phase": "mask", "round_": 3}, "secagg mask round 3"),
    ],
)
def test_a_line_names_an_exchange_as_the_run_does(world, asked, named):
    """An evaluation is named by what it evaluates (the run's log has ``round-8 evaluation``),
    not by a round number it does not carry, and an enrolment by its kind alone."""
    coordinator, spec, _ = world
    family = FAMILY if asked["kind"] in ("train", "evaluate") else None
    state = FAMILY.initial_state(len(ITEMS), seed=0) if family is not None else None
    with pytest.raises(TimeoutError) as err:
        coordinator.exchange(replace(spec, deadline_seconds=1.0), family=family, state=state,
                             task_run_id="t", **asked)  # fmt: skip
    assert str(err.value).startswith(f"shop-a: no answer to {named} within 1 s"), err.value


def test_the_liveness_edges_on_an_exact_clock(world, tmp_path, monkeypatch):
    """Each edge of :meth:`Coordinator.liveness` to the clock's tick (times exact in binary):
    a stale sign is believed one interval and a look after it was first read, not before; a
    sign aged exactly three intervals and the skew is not stale; a stop signed the instant of
    the request, or of the last sign of life, is not taken for a stop after them."""
    coordinator, spec, _ = world
    coordinator.liveness_seconds = 0.5
    key = load_identity(tmp_path / "shop-a" / "client-0.key")
    clock = [1_000_000.0]
    fake = SimpleNamespace(time=lambda: clock[0], strftime=time.strftime, gmtime=time.gmtime)
    monkeypatch.setattr("fedrec.sites.coordinator.time", fake)

    def sign(at: float, *, stopped: bool = False) -> None:
        coordinator.transport.variables[alive_variable("shop-a")] = sign_message(
            key, ALIVE, alive_fields("shop-a", at, 2.0, stopped=stopped)
        )

    sign(clock[0] - 1000)  # stale from the first read on
    assert coordinator.gone(spec) is None
    clock[0] += 2.25
    assert coordinator.gone(spec) is None  # not yet one interval (2 s) and a look (0.5 s)
    clock[0] += 0.25
    assert "its last sign of life was at" in coordinator.gone(spec)

    signed = clock[0]
    sign(signed)  # fresh
    assert coordinator.gone(spec) is None
    clock[0] = signed + 3 * 2.0 + CLOCK_SKEW
    assert coordinator.gone(spec) is None  # aged exactly the limit: not stale
    clock[0] += 0.25
    assert "its last sign of life was at" in coordinator.gone(spec)

    alive_at = clock[0]
    sign(alive_at)
    assert coordinator.gone(spec) is None
    sign(alive_at, stopped=True)  # the same instant as the last sign of life
    assert coordinator.gone(spec) is None
    clock[0] += 2.5  # however long it stands
    assert coordinator.gone(spec) is None
    clock[0] += 0.25
    asked_at = clock[0]
    sign(asked_at, stopped=True)  # the instant of the request: first read, not believed yet
    assert coordinator.gone(spec, asked_at) is None
    sign(asked_at + 0.25, stopped=True)  # after the request: believed at once
    assert "its site process stopped at" in coordinator.gone(spec, asked_at)
