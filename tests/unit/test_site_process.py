"""The site process against an in-memory transport: what it answers, keeps and refuses."""

import base64
import io
import json
import logging
import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from fedrec.sites.process import Site, SiteOptions
from models.data.schema import encode_interactions
from models.mf.family import ExplicitMF
from models.mf.federated import MFConfig
from models.privacy.dp import UserLevelDP
from models.privacy.identity import generate_identity, public_bytes, save_identity
from models.privacy.released_metrics import MetricRelease
from models.sites.budget import COUNT_NOISE
from models.sites.catalogue import item_arrays, left_out_note, read_item_arrays
from models.sites.encoding import decode_arrays, encode_arrays
from models.sites.messages import (
    ANSWER,
    REFUSAL,
    REQUEST,
    UNVERIFIED,
    BlobRef,
    RefusedMessage,
    RoundRequest,
    body_digest,
    check_answer,
    key_id,
    open_message,
    sign_message,
)
from models.sites.schema import SchemaError, check_answer_arrays
from models.sites.sealing import answer_key_field, new_answer_key, open_answer, sealing_context
from models.sites.spec import family_spec
from tests.sites_fakes import MemoryTransport

PLAIN = ExplicitMF(MFConfig(n_factors=3, clip_to=(1.0, 5.0)))
PRIVATE = ExplicitMF(MFConfig(n_factors=3, clip_to=(1.0, 5.0), dp=UserLevelDP(1.0, 20)))
COORDINATOR, OTHER = generate_identity(), generate_identity()
ANSWER_SECRET = new_answer_key()  # the run's key the answers are sealed to
ITEMS = np.arange(100, 112)


def _rows() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(8) + 5000, 6)
    items = np.concatenate([rng.choice(ITEMS, 6, replace=False) for _ in range(8)])
    frame = pd.DataFrame({"user": users, "item": items, "rating": rng.integers(1, 6, users.size)})
    return frame.astype({"rating": float})


@pytest.fixture
def world(tmp_path):
    transport = MemoryTransport()
    key = generate_identity()
    save_identity(key, tmp_path / "keys", 1)

    def start(rows: pd.DataFrame | None = None, **extra) -> Site:
        options = SiteOptions(
            **{
                "name": "shop-a",
                "data": "",
                "prefect_api": "http://unused/api",
                "mlflow": "http://unused",
                "identity": tmp_path / "keys" / "client-1.key",
                "coordinator_key": base64.b64encode(public_bytes(COORDINATOR)).decode(),
                "state_dir": tmp_path / "state",
                **extra,
            }
        )
        rows = _rows() if rows is None else rows
        data = encode_interactions(rows, rating_scale=(1.0, 5.0), source="shop-a.csv")
        # a site given a --data file reads it itself, as `fedrec site run` does
        site = Site(options, data=None if options.data else data)
        site.transport.close()
        site.transport = transport
        return site

    return transport, key, start


def _ask(
    transport,
    *,
    family,
    state_arrays=None,
    state_bytes=None,
    round_=1,
    signer=COORDINATOR,
    nonce="1",
    eval_splits=None,
    phase="train",
    items=ITEMS,
):
    catalogue = transport.put_blob("run/catalogue.npz", encode_arrays(item_arrays(items)))
    if state_arrays is None:
        state_arrays = family.state_arrays(family.initial_state(len(items), seed=0))
    data = state_bytes if state_bytes is not None else encode_arrays(state_arrays)
    state = transport.put_blob(f"run/state-{BlobRef.of('', data).sha256[:8]}.npz", data)
    request = _request(
        run="run",
        kind="train",
        phase=phase,
        round_=round_,
        nonce=nonce,
        reply_to=f"run/r{round_}/{nonce}",
        family=family_spec(family),
        state=state,
        catalogue=catalogue,
        eval_splits=(() if family.private else ("valid",)) if eval_splits is None else eval_splits,
        task_run_id=f"task-{nonce}",
    )
    return request, _post(transport, request, signer)


def _request(*, run, kind, phase, nonce, round_=0, **fields) -> RoundRequest:
    """A request to shop-a (client 1, seed 3, a random 60/20/20 split), valid now."""
    return RoundRequest(
        run=run,
        kind=kind,
        phase=phase,
        round=round_,
        label="",
        site="shop-a",
        client_id=1,
        nonce=nonce.rjust(32, "0"),
        issued_at=1e12 - 10,
        expires_at=1e12,
        seed=3,
        split={"method": "random", "valid_fraction": 0.2, "test_fraction": 0.2},
        answer_key=answer_key_field(ANSWER_SECRET),
        **fields,
    )


def _post(transport, request: RoundRequest, signer=COORDINATOR) -> str:
    """Sign and post ``request`` to shop-a; returns the digest its answer names."""
    signed = sign_message(signer, REQUEST, request.fields())
    transport.post_artifact(
        key="fedrec-request-shop-a",
        type_="fedrec-request",
        data=signed,
        task_run_id=request.task_run_id,
        flow_run_id="",
    )
    return body_digest(signed["body"])


def _opened(transport, key, request, digest) -> tuple[bytes, dict]:
    """The npz bytes and info of the site's answer, opened as the run's coordinator does."""
    (posted,) = transport.answers_on(request.task_run_id)
    body = open_message(posted["data"], key.public_key(), ANSWER)
    answer = check_answer(body, request, digest)
    sealed = transport.get_blob(answer.answer, 10**7)
    return open_answer(sealed, ANSWER_SECRET, sealing_context(request))


def _answer(transport, key, request, digest) -> bytes:
    return _opened(transport, key, request, digest)[0]


def _refusal(transport, key, request) -> str:
    (posted,) = transport.answers_on(request.task_run_id)
    return open_message(posted["data"], key.public_key(), REFUSAL)["reason"]


@pytest.fixture(autouse=True)
def _now(monkeypatch):
    monkeypatch.setattr("fedrec.sites.process.time.time", lambda: 1e12 - 5)


def test_a_request_is_answered_with_protocol_arrays_only(world):
    transport, key, start = world
    request, digest = _ask(transport, family=PLAIN)
    start(allow_exact=True).poll_once()
    arrays = decode_arrays(_answer(transport, key, request, digest), max_bytes=10**7)
    update, evaluations = check_answer_arrays(arrays, client_id=1, n_items=len(ITEMS))
    assert update.items.size and set(update.arrays) == {"gram", "rhs"}
    assert set(evaluations) >= {"valid"}
    assert any("shop-a answered train round 1" in line for line in transport.logs)


def test_a_sites_line_names_the_round_whose_model_it_evaluated(world):
    """Evaluation runs one round late: round 3's request evaluates the model after round 2,
    whose metrics the coordinator logs as round 2. The site's line says both."""
    transport, _, start = world
    _ask(transport, family=PLAIN, round_=3, nonce="1")
    _ask(transport, family=PLAIN, round_=4, nonce="2", eval_splits=())
    start(allow_exact=True).poll_once()
    answered = [line for line in transport.logs if "answered" in line]
    assert any(
        re.fullmatch(r"shop-a answered train round 3 and evaluate round-2 \(\d+ bytes up\)", line)
        for line in answered
    ), answered
    assert any(
        re.fullmatch(r"shop-a answered train round 4 \(\d+ bytes up\)", line) for line in answered
    ), answered


def test_a_request_the_coordinator_stopped_waiting_for_is_neither_answered_nor_charged(
    world, tmp_path
):
    """A site that comes back after a deadline finds the request still unexpired (clock skew
    allowed): its task run has ended, so an answer would spend the users' budget for nothing."""
    transport, key, start = world
    stale, _ = _ask(transport, family=PRIVATE, nonce="1")
    transport.ended.add(stale.task_run_id)
    site = start()
    site.poll_once()
    assert transport.answers_on(stale.task_run_id) == []
    assert not (tmp_path / "state" / "budget" / "entries.jsonl").exists()
    current, digest = _ask(transport, family=PRIVATE, nonce="2")  # a waiting task run: answered
    site.poll_once()
    assert _answer(transport, key, current, digest)
    assert len((tmp_path / "state" / "budget" / "entries.jsonl").read_text().splitlines()) == 1


def test_a_private_retry_and_a_restart_get_the_kept_answer_bit_for_bit(world):
    transport, key, start = world
    site = start()
    first, digest = _ask(transport, family=PRIVATE, nonce="1")
    site.poll_once()
    retry, retry_digest = _ask(transport, family=PRIVATE, nonce="2")  # a new nonce, same round
    site.poll_once()
    again, again_digest = _ask(transport, family=PRIVATE, nonce="3")
    start().poll_once()  # a restarted process on the same state folder
    kept = _answer(transport, key, first, digest)
    assert _answer(transport, key, retry, retry_digest) == kept
    assert _answer(transport, key, again, again_digest) == kept
    fresh, fresh_digest = _ask(transport, family=PRIVATE, round_=2, nonce="4")
    site.poll_once()
    assert _answer(transport, key, fresh, fresh_digest) != kept  # new round: new noise


def test_a_private_site_refuses_an_answered_round_about_another_state(world):
    transport, key, start = world
    site = start()
    _ask(transport, family=PRIVATE, nonce="1")
    site.poll_once()
    state = PRIVATE.state_arrays(PRIVATE.initial_state(len(ITEMS), seed=9))
    other, _ = _ask(transport, family=PRIVATE, state_arrays=state, nonce="2")
    site.poll_once()
    assert "answered for another global state" in _refusal(transport, key, other)


def test_a_pruned_private_answer_asked_again_is_refused_not_released_a_second_time(world, tmp_path):
    """The attack: once a site's kept answers are pruned, the coordinator asks the same
    exchange again (a new nonce). Answered afresh, the site would release a second noisy copy
    of the same sums (two draws average the noise down); it refuses, and charges nothing."""
    from models.sites.answers import prune_answers

    transport, key, start = world
    site = start()
    first, digest = _ask(transport, family=PRIVATE, nonce="1")
    site.poll_once()
    assert _answer(transport, key, first, digest)
    ledger = tmp_path / "state" / "budget" / "entries.jsonl"
    charged = ledger.read_text()
    assert prune_answers(tmp_path / "state" / "record", 0.0, now=1e12).answers == 1
    for process, nonce in ((site, "2"), (start(), "3")):  # the running site, a restarted one
        again, _ = _ask(transport, family=PRIVATE, nonce=nonce)
        process.poll_once()
        assert "its kept answer has been pruned" in _refusal(transport, key, again)
    assert ledger.read_text() == charged


def test_a_request_signed_by_another_key_gets_only_a_notice_that_it_did_not_verify(world):
    transport, key, start = world
    request, _ = _ask(transport, family=PLAIN, signer=OTHER)
    site = start(allow_exact=True)
    site.poll_once()
    (posted,) = transport.answers_on(request.task_run_id)  # no answer, no refusal: a notice
    notice = open_message(posted["data"], key.public_key(), UNVERIFIED)
    assert notice["nonce"] == request.nonce and notice["expects"] == key_id(COORDINATOR)
    assert notice["reason"].startswith("signature does not verify against key")
    assert transport.logs == [] and not site.record.answered(request.nonce)

    # nor is anything said about a request out of date, or one its coordinator no longer awaits
    late, _ = _ask(transport, family=PLAIN, signer=OTHER, nonce="2")
    transport.ended.add(late.task_run_id)
    site.poll_once()
    assert transport.answers_on(late.task_run_id) == []


@pytest.mark.parametrize(
    ("signer", "change", "posted_on"),
    [
        (COORDINATOR, {"site": "shop-b"}, None),  # genuine, but another site's to answer
        (OTHER, {"site": "shop-b"}, None),
        (OTHER, {"task_run_id": "../../flow_runs"}, None),  # ids that would go into API paths
        (OTHER, {"flow_run_id": "a/b"}, None),
        (OTHER, {"expires_at": 1e12 - 70}, None),  # out of date by more than the clock skew
        (OTHER, {}, "task-elsewhere"),  # posted on another task run than it names
    ],
)
def test_nothing_is_said_about_a_request_that_is_not_this_sites_to_answer(
    world, signer, change, posted_on
):
    """A site tells a coordinator why it could not use a request only when the request names
    this site, well-formed run ids, a time still current and the task run it was posted on:
    anything else would let anyone on the API make the site post where they choose."""
    transport, key, start = world
    request = _request(run="run", kind="enroll", phase="private", nonce="1", reply_to="run/e/1",
                       task_run_id="task-1")  # fmt: skip
    signed = sign_message(signer, REQUEST, request.fields() | change)
    task_run_id = posted_on or signed["body"]["task_run_id"]
    transport.post_artifact(key="fedrec-request-shop-a", type_="fedrec-request", data=signed,
                            task_run_id=task_run_id, flow_run_id="")  # fmt: skip
    site = start()
    site.poll_once()
    assert transport.answers_on(task_run_id) == [] and transport.logs == []
    assert not site.record.answered(request.nonce) and _charges(site) == []

    # the same request, signed by its coordinator and posted where it names, gets its answer:
    # here a refusal (this private site needs a published catalogue)
    _post(transport, request)
    site.poll_once()
    assert "sends no item ids: list the catalogue" in _refusal(transport, key, request)


def test_a_genuine_request_the_site_cannot_read_is_refused_with_its_reason(world):
    """A request of a coordinator of another protocol version (a field this site does not
    know) was only logged at the site; the coordinator is now told why, signed."""
    transport, key, start = world
    request = _request(run="run", kind="enroll", phase="private", nonce="1", reply_to="run/e/1",
                       task_run_id="task-1")  # fmt: skip
    signed = sign_message(COORDINATOR, REQUEST, request.fields() | {"quota": 3})
    transport.post_artifact(key="fedrec-request-shop-a", type_="fedrec-request", data=signed,
                            task_run_id="task-1", flow_run_id="")  # fmt: skip
    site = start()
    site.poll_once()
    assert _refusal(transport, key, request) == "request has unknown fields ['quota']"
    assert _charges(site) == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda s: s["factors"].__setitem__((0, 0), np.nan), "NaN"),
        (lambda s: s.__setitem__("factors", np.zeros((len(ITEMS), 5))), "shape"),
        (lambda s: s.__setitem__("payload", np.zeros(3)), "unexpected"),
    ],
)
def test_a_state_outside_the_schema_is_refused_with_its_reason(world, change, reason):
    transport, key, start = world
    state = PLAIN.state_arrays(PLAIN.initial_state(len(ITEMS), seed=0))
    change(state)
    buffer = io.BytesIO()
    np.savez(buffer, **state)  # bypasses the encoder's own checks, as a hostile sender would
    request, _ = _ask(transport, family=PLAIN, state_bytes=buffer.getvalue())
    start(allow_exact=True).poll_once()
    assert reason in _refusal(transport, key, request)


def test_a_private_site_counts_each_release_once_and_refuses_one_past_its_cap(world, tmp_path):
    transport, key, start = world
    site = start()
    _ask(transport, family=PRIVATE, nonce="1")
    site.poll_once()
    _ask(transport, family=PRIVATE, nonce="2")  # a retry: the kept answer, no new release
    site.poll_once()
    entries = tmp_path / "state" / "budget" / "entries.jsonl"
    (line,) = entries.read_text().splitlines()
    cost = json.loads(line)["epsilon"]
    assert cost > 0 and json.loads(line)["release"] == {
        "kind": "full", "noise_multiplier": 1.0, "sampling_rate": 1.0,
    }  # fmt: skip

    capped = start(max_epsilon=cost * 1.05)  # the operator lowers the cap; the site restarts
    later, _ = _ask(transport, family=PRIVATE, round_=2, nonce="3")
    capped.poll_once()
    assert "privacy budget of this site" in _refusal(transport, key, later)
    assert entries.read_text().splitlines() == [line]  # refused: nothing charged


def test_a_private_site_sends_no_uncounted_evaluation_sums(world):
    transport, key, start = world
    site = start()
    with_sums, _ = _ask(transport, family=PRIVATE, eval_splits=("valid",), nonce="1")
    site.poll_once()
    assert "carries no evaluation sums" in _refusal(transport, key, with_sums)


def test_a_private_site_answers_only_its_familys_phases(world):
    """The attack: a private family's request in the "mean" phase, the exact sums of the global
    mean (rating sum and row count), under a noise multiplier of 1e6 that the site would charge
    as nearly free. With a one-item catalogue and a threshold per request, each answer would be
    an exact count of the users who rated that item that high."""
    transport, key, start = world
    site = start()
    cheap = ExplicitMF(MFConfig(n_factors=3, clip_to=(1.0, 5.0), dp=UserLevelDP(1e6, 20)))
    mean, _ = _ask(transport, family=cheap, nonce="1", phase="mean")
    site.poll_once()
    assert "phase 'mean' is not one of the explicit family's (biases, train, DP)" in _refusal(
        transport, key, mean
    )
    assert not (site.budget.folder / "entries.jsonl").exists()  # refused before any charge
    with pytest.raises(ValueError, match="no 'mean' phase"):  # nor would the family answer it
        cheap.client_round(site._client(mean), cheap.initial_state(len(ITEMS), 0), "mean",
                           np.random.default_rng(0), ())  # fmt: skip


def test_an_evaluation_release_is_answered_only_with_the_bounds_its_noise_assumes(world):
    """The attack: an evaluation whose release claims one row per user and errors clipped to
    1e-12 (so its noise on the error sums is ~0), for a family that caps and clips nothing: the
    exact error sums of every held-out row, charged as nearly free."""
    transport, key, start = world
    site = start()
    release = {"noise_multiplier": 1e3, "max_rows": 1, "error_clip": 1e-12}
    catalogue = transport.put_blob("run/catalogue.npz", encode_arrays({"items": ITEMS}))

    def evaluate(family, nonce):
        data = encode_arrays(family.state_arrays(family.initial_state(len(ITEMS), seed=0)))
        state = transport.put_blob(f"run/state-{nonce}.npz", data)
        request = _request(run="ev", kind="evaluate", phase="train", round_=1, nonce=nonce,
                           reply_to=f"run/ev/{nonce}", family=family_spec(family), state=state,
                           catalogue=catalogue, eval_splits=("valid",), task_run_id=f"task-{nonce}",
                           release=release)  # fmt: skip
        return request, _post(transport, request)

    unbounded, _ = evaluate(PLAIN, "1")
    site.poll_once()
    assert "does not bound each user's evaluation sums as the release's noise assumes" in (
        _refusal(transport, key, unbounded)
    )
    assert not (site.budget.folder / "entries.jsonl").exists()
    # the same release for a family that applies those bounds is answered, and counted
    bounded = ExplicitMF(PLAIN.config, released=MetricRelease(**release))
    request, digest = evaluate(bounded, "2")
    site.poll_once()
    arrays = decode_arrays(_answer(transport, key, request, digest), max_bytes=10**7)
    _, evaluations = check_answer_arrays(arrays, client_id=1, n_items=len(ITEMS))
    assert set(evaluations) == {"valid", "baseline/valid"} and evaluations["valid"][1] is None
    (line,) = (site.budget.folder / "entries.jsonl").read_text().splitlines()
    assert json.loads(line)["release"]["kind"] == "evaluation"


def test_an_evaluation_without_a_release_is_exact_from_an_exact_site_and_refused_if_private(world):
    """An evaluation request without a DP release: a site that answers exact runs sends the
    exact sums of its own split (what the family computes there), uncounted; the same request
    for a private family is refused before any charge, since nothing would bound or noise it."""
    transport, key, start = world
    site = start(allow_exact=True)
    catalogue = transport.put_blob("run/catalogue.npz", encode_arrays({"items": ITEMS}))

    def evaluate(family, nonce, run):
        state = family.initial_state(len(ITEMS), seed=0)
        blob = transport.put_blob(
            f"run/state-{nonce}.npz", encode_arrays(family.state_arrays(state))
        )
        request = _request(run=run, kind="evaluate", phase="train", round_=1, nonce=nonce,
                           reply_to=f"run/ev/{nonce}", family=family_spec(family), state=blob,
                           catalogue=catalogue, eval_splits=("valid",), task_run_id=f"task-{nonce}")  # fmt: skip
        return request, state, _post(transport, request)

    request, state, digest = evaluate(PLAIN, "1", run="exact")
    site.poll_once()
    arrays = decode_arrays(_answer(transport, key, request, digest), max_bytes=10**7)
    _, evaluations = check_answer_arrays(arrays, client_id=1, n_items=len(ITEMS))
    expected = PLAIN.evaluate(site._client(request), state, ("valid",))
    assert set(evaluations) == set(expected) == {"valid", "baseline/valid"}
    for split, (sums, _) in expected.items():
        assert evaluations[split][0] == pytest.approx(sums, rel=1e-6)
    assert not (site.budget.folder / "entries.jsonl").exists()  # an exact answer counts nothing

    private, _, _ = evaluate(PRIVATE, "2", run="private")
    site.poll_once()
    assert "a private evaluate answer this site cannot account for" in (
        _refusal(transport, key, private)
    )
    assert not (site.budget.folder / "entries.jsonl").exists()


def test_a_state_that_would_make_a_private_answer_non_finite_is_refused_before_any_charge(world):
    """The attack: an item factor of 1e200 (finite, so it passed the schema) made the fold-in of
    every user who rated that item NaN. The NaN answer was refused after the charge, and the
    refusal said whether any user rated the item (with a positive threshold: at least t), for a
    noise multiplier of 1e6, i.e. for free; an evaluation's NaN error sums were floored to an
    exact 0, unnoised."""
    transport, key, start = world
    site = start()
    cheap = ExplicitMF(MFConfig(n_factors=3, clip_to=(1.0, 5.0), dp=UserLevelDP(1e6, 20)))
    arrays = cheap.state_arrays(cheap.initial_state(len(ITEMS), seed=0))
    arrays["factors"] = arrays["factors"].copy()
    arrays["factors"][3] = 1e200
    probe, _ = _ask(transport, family=cheap, state_arrays=arrays, nonce="1")
    site.poll_once()
    assert "'factors' holds values beyond +-1e+06" in _refusal(transport, key, probe)
    assert not (site.budget.folder / "entries.jsonl").exists()  # whatever the rows: no charge

    # the largest state allowed, with the smallest ridge allowed: a finite answer, answered
    edge = ExplicitMF(replace(cheap.config, reg=1e-6))
    arrays["factors"][3] = 1e6
    request, digest = _ask(transport, family=edge, state_arrays=arrays, nonce="2", round_=2)
    site.poll_once()
    answer = decode_arrays(_answer(transport, key, request, digest), max_bytes=10**7)
    assert all(np.isfinite(a).all() for a in answer.values() if a.dtype.kind == "f")


def test_a_site_answers_no_exact_request_unless_allowed_so_its_cap_cannot_be_bypassed(world):
    transport, key, start = world
    capped = start()  # the default: private requests only
    _ask(transport, family=PRIVATE, nonce="1")
    capped.poll_once()
    entries = (capped.budget.folder / "entries.jsonl").read_text()
    # the attack: past (or at) the cap, ask the same rows again without DP
    for nonce, family, splits in (("2", PLAIN, ("valid",)), ("3", PLAIN, ())):
        exact, _ = _ask(transport, family=family, round_=2, nonce=nonce, eval_splits=splits)
        capped.poll_once()
        assert "answers only private requests" in _refusal(transport, key, exact)
    assert (capped.budget.folder / "entries.jsonl").read_text() == entries  # nothing released

    # the same request to a site that allows exact answers gets the users' exact sums
    exact, digest = _ask(transport, family=PLAIN, round_=2, nonce="4", eval_splits=())
    start(allow_exact=True).poll_once()
    arrays = decode_arrays(_answer(transport, key, exact, digest), max_bytes=10**7)
    update, _ = check_answer_arrays(arrays, client_id=1, n_items=len(ITEMS))
    assert update.items.size and set(update.arrays) == {"gram", "rhs"}


def test_private_answers_come_from_the_sites_entropy_not_from_the_request(world, tmp_path):
    transport, key, start = world
    request, digest = _ask(transport, family=PRIVATE, nonce="1")
    start().poll_once()
    twin = start(state_dir=tmp_path / "twin")  # the same rows, no kept answer
    twin.transport = MemoryTransport()
    same, same_digest = _ask(twin.transport, family=PRIVATE, nonce="1")  # the same request
    twin.poll_once()
    first = decode_arrays(_answer(transport, key, request, digest), max_bytes=10**7)
    twin = decode_arrays(_answer(twin.transport, key, same, same_digest), max_bytes=10**7)
    # everything the coordinator chose (seed, round, client id, state) is the same: a stream
    # derived from it would give the twin the same noise, and the difference would be zero
    assert set(first) == set(twin)
    assert any(not np.array_equal(first[k], twin[k]) for k in first if first[k].dtype.kind == "f")


def _enrol(
    transport,
    *,
    phase="private",
    catalogue=ITEMS,
    run="run",
    nonce="9",
    epsilon=None,
    rating_scale=None,
):
    published = None
    if catalogue is not None:
        published = transport.put_blob(
            f"{run}/catalogue.npz", encode_arrays(item_arrays(catalogue))
        )
    request = _request(
        run=run,
        kind="enroll",
        phase=phase,
        nonce=nonce,
        reply_to=f"{run}/enroll/{nonce}",
        catalogue=published,
        task_run_id=f"task-{run}-{nonce}",
        epsilon=epsilon,
        **({} if rating_scale is None else {"rating_scale": rating_scale}),
    )
    return request, _post(transport, request)


def _enrolment(transport, key, request, digest):
    data, info = _opened(transport, key, request, digest)
    return read_item_arrays(decode_arrays(data, max_bytes=10**7), "enrolment"), info


def _charges(site) -> list[dict]:
    path = site.budget.folder / "entries.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_private_site_enrols_without_its_item_ids_or_exact_counts(world):
    """The attack: the coordinator reads what a site tells at enrolment. Exact, that is the
    item ids its users rated (an item one user rated shows that user's row) and its counts of
    users and rows (with every other user known, the count says whether one more is there)."""
    transport, key, start = world
    rare = _rows().groupby("item")["user"].nunique().idxmin()  # an item few users rated

    # the weak version: a site that answers runs without DP, asked without a catalogue
    request, digest = _enrol(transport, phase="exact", catalogue=None, nonce="1")
    start(allow_exact=True).poll_once()
    items, info = _enrolment(transport, key, request, digest)
    assert rare in items and info["n_users"] == 8 and info["n_train"] > 0

    site = start()  # the default: private runs only
    without, _ = _enrol(transport, catalogue=None, nonce="2")
    site.poll_once()
    assert "sends no item ids: list the catalogue" in _refusal(transport, key, without)
    assert _charges(site) == []  # refused before anything was counted

    request, digest = _enrol(transport, run="run-1", nonce="3")
    site.poll_once()
    items, info = _enrolment(transport, key, request, digest)
    assert items.size == 0 and {"n_train", "n_valid", "n_test", "outside_rows"}.isdisjoint(info)
    (line,) = _charges(site)  # the noisy count, charged before it was drawn
    assert line["release"] == {"kind": "count", "noise_multiplier": COUNT_NOISE,
                               "sampling_rate": 1.0} and line["epsilon"] > 0  # fmt: skip
    retry, retry_digest = _enrol(transport, run="run-1", nonce="4")  # the same run asks again
    site.poll_once()
    again = _enrolment(transport, key, retry, retry_digest)[1]
    assert again["n_users"] == info["n_users"]  # the kept answer: no second draw
    assert len(_charges(site)) == 1


def test_a_site_with_product_codes_enrols_and_trains_against_a_text_catalogue(world):
    """Item ids that are text (a shop's product codes) cross the wire as UTF-8 bytes: the site
    sends its codes to enrol, and numbers its rows by their place in a published text list."""
    transport, key, start = world
    rows = _rows().assign(item=lambda f: "sku-" + f["item"].astype(str))
    site = start(rows=rows, allow_exact=True)
    request, digest = _enrol(transport, phase="exact", catalogue=None, nonce="1")
    site.poll_once()
    items, info = _enrolment(transport, key, request, digest)
    assert items.tolist() == sorted(rows["item"].unique())
    assert info["n_train"] + info["n_valid"] + info["n_test"] == len(rows)
    assert info["outside_rows"] == info["outside_items"] == 0  # its own item set leaves none out

    published = np.array(sorted(rows["item"].unique())[::2], dtype=object)
    request, digest = _enrol(transport, phase="exact", catalogue=published, run="run-2", nonce="2")
    site.poll_once()
    items, info = _enrolment(transport, key, request, digest)
    inside = rows["item"].isin(published)
    assert items.size == 0 and info["outside_rows"] == (~inside).sum()
    assert info["n_train"] + info["n_valid"] + info["n_test"] == inside.sum()

    request, digest = _ask(transport, family=PLAIN, items=published, nonce="3")
    site.poll_once()
    arrays = decode_arrays(_answer(transport, key, request, digest), max_bytes=10**7)
    update, _ = check_answer_arrays(arrays, client_id=1, n_items=len(published))
    assert update.counts.sum() == info["n_train"]  # the training rows of the listed codes
    assert set(published[update.items]) <= set(rows["item"])


def test_a_private_sites_count_is_noised_from_its_own_entropy(world):
    transport, key, start = world
    site = start()
    counts = []
    for run in range(8):  # eight runs, the same rows: a fixed or seed-derived count repeats
        request, digest = _enrol(transport, run=f"run-{run}", nonce=str(run + 1))
        site.poll_once()
        counts.append(_enrolment(transport, key, request, digest)[1]["n_users"])
    assert len(set(counts)) > 2 and np.std(counts) > 2, counts
    assert len(_charges(site)) == 8


def test_a_private_sites_count_is_its_users_plus_centred_noise_and_at_least_one(world, monkeypatch):
    """The count sent is the site's users plus one draw of N(0, COUNT_NOISE), rounded, and
    never below one user; the draw is what the accountant charged for (a shifted or rescaled
    draw would be a release other than the one counted)."""
    transport, key, start = world
    site = start()
    draws: list[tuple[float, float]] = []

    class _Drawn:
        def __init__(self, value: float) -> None:
            self.value = value

        def normal(self, loc: float, scale: float) -> float:
            draws.append((loc, scale))
            return self.value

    for nonce, (run, value, expected) in enumerate(
        [("up", 2.6, 11), ("down", -3.4, 5), ("floor", -50.0, 1)], 1
    ):
        monkeypatch.setattr("fedrec.sites.process.fresh_rng", lambda v=value: _Drawn(v))
        request, digest = _enrol(transport, run=run, nonce=str(nonce))
        site.poll_once()
        assert _enrolment(transport, key, request, digest)[1]["n_users"] == expected  # 8 users
    assert draws == [(0.0, COUNT_NOISE)] * 3 and len(_charges(site)) == 3


def test_a_private_site_tells_a_run_without_dp_nothing_and_charges_nothing(world):
    transport, key, start = world
    site = start()
    request, digest = _enrol(transport, phase="exact", nonce="1")
    site.poll_once()
    items, info = _enrolment(transport, key, request, digest)
    assert items.size == 0 and info["exact"] == 0 and "n_users" not in info
    assert "fingerprint" not in info and _charges(site) == []


def test_an_exact_site_counts_only_the_rows_a_published_catalogue_keeps(world):
    transport, key, start = world
    rows = _rows()
    kept = ITEMS[::2]
    request, digest = _enrol(transport, phase="exact", catalogue=kept, nonce="1")
    start(allow_exact=True).poll_once()
    items, info = _enrolment(transport, key, request, digest)
    inside = rows[rows["item"].isin(kept)]
    assert items.size == 0
    assert info["n_train"] + info["n_valid"] + info["n_test"] == len(inside)
    # the rows left out, which the coordinator logs (a private site tells only its own log)
    left_rows, left_items = len(rows) - len(inside), rows.loc[~rows["item"].isin(kept), "item"]
    assert (info["outside_rows"], info["outside_items"]) == (left_rows, left_items.nunique())
    assert left_out_note("shop-a", info) == (
        f"shop-a: {left_rows} of its rows, of {left_items.nunique()} items the published "
        "catalogue lacks, are left out of this run"
    )
    assert left_out_note("shop-a", {"n_users": 3}) is None  # a private site's enrolment


# how `fedrec site run` reads --data with its default columns
SITE_READS = {"user_col": "user_id", "item_col": "item_id", "rating_col": "rating",
              "timestamp_col": "timestamp"}  # fmt: skip


def _site_file(tmp_path, name: str, rows: pd.DataFrame) -> str:
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    rows.rename(columns={"user": "user_id", "item": "item_id"}).to_csv(path, index=False)
    return str(path)


def test_a_site_without_ratings_refuses_a_rating_models_run_at_enrolment_and_in_its_rounds(
    world, tmp_path
):
    """The weak version: a site whose file has no rating column (``score`` instead) read its
    rows as implicit feedback, every rating 1, said nothing, and answered a rating model's
    requests; the run's validation RMSE then counted its constant 1s. It now refuses a rating
    model's run at enrolment, before anything is trained or counted, and any request of a
    rating model after it, in one line naming the file and what is allowed."""
    transport, key, start = world
    path = _site_file(tmp_path, "c-norating.csv", _rows().rename(columns={"rating": "score"}))
    reads = SITE_READS | {"rating_scale": (1.0, 5.0)}
    site = start(data=path, read_options=reads, allow_exact=True)
    assert site.data.rating_scale is None  # read as implicit feedback

    request, _ = _enrol(transport, phase="exact", nonce="1", rating_scale=(1.0, 5.0))
    site.poll_once()
    reason = _refusal(transport, key, request)
    assert reason == (
        "shop-a's data c-norating.csv has no rating column ('rating'): it holds implicit "
        "feedback, and this run trains a rating model (explicit feedback, ratings 1..5); "
        "allowed: a file with a rating column (fedrec site run --rating-col), or a run "
        "without ratings (fedrec train --feedback implicit --implicit-model neural)"
    )
    train, _ = _ask(transport, family=PLAIN, nonce="2")  # asked without enrolling first
    site.poll_once()
    assert _refusal(transport, key, train) == reason

    without, digest = _enrol(transport, phase="exact", run="run-2", nonce="3")  # a neural run
    site.poll_once()
    assert _enrolment(transport, key, without, digest)[1]["n_users"] == 8

    private = start(data=path, read_options=reads, state_dir=tmp_path / "private")
    private.transport = MemoryTransport()
    asked, _ = _enrol(private.transport, epsilon=1.0, rating_scale=(1.0, 5.0))
    private.poll_once()
    assert _refusal(private.transport, key, asked) == reason
    assert _charges(private) == []  # refused before its noisy count was counted


def test_a_site_on_another_rating_scale_refuses_the_run_without_telling_its_ratings(
    world, tmp_path
):
    """The weak version: a site whose ratings are on 2..10 (``--rating-scale 1,10``) enrolled
    in a run on 1..5 and answered its rounds; the run's validation RMSE went to 1.96. A site
    now refuses a run on another scale than its own, naming both (each is a setting, not a
    value of its rows). A site that takes its scale from its rows (``--rating-scale data``)
    cannot say whether they fit the run's without telling something of them: it is refused
    in the same words whatever its rows hold."""
    transport, key, start = world
    doubled = _rows().assign(rating=lambda f: f["rating"] * 2)  # 2..10
    path = _site_file(tmp_path, "shop-a.csv", doubled)
    site = start(data=path, read_options=SITE_READS | {"rating_scale": (1.0, 10.0)},
                 allow_exact=True)  # fmt: skip

    request, _ = _enrol(transport, phase="exact", nonce="1", rating_scale=(1.0, 5.0))
    site.poll_once()
    reason = _refusal(transport, key, request)
    assert reason == (
        "shop-a's data shop-a.csv is on the rating scale 1..10 (fedrec site run --rating-scale) "
        "and this run's is 1..5; allowed: a site on the run's scale (--rating-scale 1,5, its "
        "ratings within it), or a run on the site's (fedrec train --rating-scale 1,10)"
    )
    train, _ = _ask(transport, family=PLAIN, nonce="2")
    site.poll_once()
    assert _refusal(transport, key, train) == reason
    same, digest = _enrol(transport, phase="exact", run="run-10", nonce="3",
                          rating_scale=(1.0, 10.0))  # fmt: skip
    site.poll_once()
    assert _enrolment(transport, key, same, digest)[1]["n_users"] == 8

    reasons = []
    for name, rows in (("doubled", doubled), ("plain", _rows())):
        own = start(data=_site_file(tmp_path, f"{name}/shop-a.csv", rows),
                    read_options=SITE_READS | {"rating_scale": None}, allow_exact=True,
                    state_dir=tmp_path / f"{name}-state")  # fmt: skip
        own.transport = MemoryTransport()
        asked, _ = _enrol(own.transport, phase="exact", rating_scale=(1.0, 5.0))
        from_data, digest = _enrol(own.transport, phase="exact", run="run-data", nonce="8",
                                   rating_scale="data")  # fmt: skip
        own.poll_once()
        reasons.append(_refusal(own.transport, key, asked))
        assert _enrolment(own.transport, key, from_data, digest)[1]["n_users"] == 8
    assert (
        reasons
        == [
            "shop-a's data shop-a.csv takes its rating scale from its rows (fedrec site run "
            "--rating-scale data), which cannot be checked against this run's 1..5 without telling "
            "something of them; allowed: a site on the run's scale (--rating-scale 1,5, its ratings "
            "within it)"
        ]
        * 2
    )


def test_a_site_says_when_it_cannot_reach_the_coordinator_and_when_it_can_again(world, caplog):
    import logging

    from fedrec.sites.transport import TransportError

    _, _, start = world
    site = start()
    answers = iter([TransportError("GET http://unused/api/artifacts: connection refused")] * 2)

    def poll_once() -> None:
        failure = next(answers, None)
        if failure is not None:
            raise failure

    site.poll_once = poll_once
    with caplog.at_level(logging.INFO, logger="fedrec.site"):
        states = [site._poll_reporting(None)]
        states.append(site._poll_reporting(states[-1]))
        states.append(site._poll_reporting(states[-1]))

    assert states == [False, False, True]
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert said[0][0] == logging.ERROR and said[0][1].startswith("shop-a: not connected: GET")
    assert "check --prefect-api http://unused/api" in said[0][1]
    assert said[1][0] == logging.WARNING  # still down: said once as an error, then as it goes
    assert said[2] == (logging.INFO, "shop-a: connected to http://unused/api")
    # the artifact store out of reach is the MLflow server's fault, not the Prefect API's
    blob = TransportError("downloading fedrec-sites/run-1/catalogue.npz: ConnectError")
    blob.mlflow = True
    answers = iter([blob])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedrec.site"):
        assert site._poll_reporting(True) is False
    said = caplog.records[0].getMessage()
    assert f"check --mlflow {site.options.mlflow} (retrying" in said, said


def test_a_private_site_refuses_a_run_it_cannot_finish_before_counting_anything(world):
    """The waste: a private run whose epsilon the site's users could not spend was refused only
    at its first training answer, after enrolment had charged the noisy user count, so every
    such run (a retried one too) took budget for nothing. The enrolment now says the run's
    epsilon, and the site refuses it first."""
    transport, key, start = world
    site = start(max_epsilon=2.0)
    fits, digest = _enrol(transport, run="run-1", nonce="1", epsilon=0.5)
    site.poll_once()
    assert _enrolment(transport, key, fits, digest)[1]["n_users"] >= 1
    (count,) = _charges(site)
    assert 0 < count["epsilon"] < 0.5  # the noisy count alone

    # the weak version: an enrolment that does not say what the run costs is answered and
    # charged, though the run cannot finish within the cap
    blind, digest = _enrol(transport, run="run-2", nonce="2")
    site.poll_once()
    _enrolment(transport, key, blind, digest)
    assert len(_charges(site)) == 2

    spent = 2 * count["epsilon"]  # every user is in both runs: their counts add up
    room = 2.0 - spent
    beyond, _ = _enrol(transport, run="run-3", nonce="3", epsilon=room * 1.01)
    site.poll_once()
    reason = _refusal(transport, key, beyond)
    assert reason == (
        f"privacy budget of this site: this run asks epsilon {room * 1.01:.3g} more, which "
        "would take some of its users past their cap of epsilon 2: refused before anything of "
        "it was counted"
    )
    assert len(_charges(site)) == 2  # nothing charged

    within, digest = _enrol(transport, run="run-4", nonce="4", epsilon=room * 0.99)
    site.poll_once()
    _enrolment(transport, key, within, digest)
    assert [c["run"] for c in _charges(site)] == ["run-1", "run-2", "run-4"]


def _refusal_of_a_costly_run(tmp_path, n_users: int, **extra) -> tuple[str, str]:
    """What a private-only site with ``n_users`` users posts on the Prefect API when a run asks
    more epsilon than its cap: the signed refusal's reason and its log line."""
    folder = tmp_path / f"site-{n_users}-{len(extra)}"

    def rows() -> pd.DataFrame:
        users = np.repeat(np.arange(n_users) + 5000, 2)
        items = np.resize(ITEMS, users.size)
        return pd.DataFrame({"user": users, "item": items, "rating": 4.0})

    transport = MemoryTransport()
    folder.mkdir()
    save_identity(generate_identity(), folder / "keys", 1)
    options = SiteOptions(
        name="shop-a", data="", prefect_api="http://unused/api", mlflow="http://unused",
        identity=folder / "keys" / "client-1.key",
        coordinator_key=base64.b64encode(public_bytes(COORDINATOR)).decode(),
        state_dir=folder / "state", **extra,
    )  # fmt: skip
    site = Site(options, data=encode_interactions(rows(), rating_scale=(1.0, 5.0), source="s"))
    site.transport.close()
    site.transport = transport
    _enrol(transport, epsilon=1e6)
    site.poll_once()
    (answer,) = [a for a in transport.artifacts if a["type"] == "fedrec-answer"]
    return answer["data"]["body"]["reason"], "\n".join(transport.logs)


def test_a_budget_refusal_on_the_api_does_not_give_away_the_sites_user_count(tmp_path, caplog):
    """A site sends its number of users only with noise, charged to their budget. Its refusals
    go on the Prefect API, which every reader there sees, and say which cap a release would
    pass, not what its users have spent (which is for the site's own log). A delta cap of
    1 / users would name the count in any figure computed with it (a cap of 0.00318 is 314
    users); the cap is a public number, the same in the site's own line whatever the count."""
    with caplog.at_level(logging.WARNING, logger="fedrec.site"):
        posted = {n: _refusal_of_a_costly_run(tmp_path, n) for n in (314, 315, 2718)}

    own = [r.getMessage() for r in caplog.records if "refused enroll of run" in r.getMessage()]
    caps = {float(re.search(r"delta [0-9.e-]+ of ([0-9.e-]+)", line).group(1)) for line in own}
    assert len(own) == 3 and caps == {1e-6}
    # on the API: the same words whatever the count
    assert len({reason for reason, _ in posted.values()}) == 1
    assert len({logs for _, logs in posted.values()}) == 1
    assert posted[314][0] == (
        "privacy budget of this site: this run asks epsilon 1e+06 more, which would take some "
        "of its users past their cap of epsilon 10: refused before anything of it was counted"
    )


@pytest.mark.parametrize("family", [PLAIN, PRIVATE], ids=["exact", "private"])
def test_an_error_that_quotes_the_sites_data_reaches_only_the_sites_own_log(
    world, caplog, monkeypatch, family
):
    """The attack: an error raised while the site computes its answer was posted on the Prefect
    API in its own words, and a library's message may quote a value of the rows (here one of
    the site's user ids, as ``int('u-5003')`` would). Every reader of the API saw it. Now the
    refusal there names the error's type; the site's own log keeps the message."""
    transport, key, start = world
    secret = "5003"  # a user id of the site's rows

    def fails(*args, **kwargs):
        raise ValueError(f"invalid literal for int() with base 10: 'u-{secret}'")

    monkeypatch.setattr(Site, "_train", fails)
    request, _ = _ask(transport, family=family)
    with caplog.at_level(logging.WARNING, logger="fedrec.site"):
        start(allow_exact=True).poll_once()

    reason = _refusal(transport, key, request)
    assert reason == ("could not compute its answer (ValueError: the site's own log says why)")
    posted = json.dumps([transport.artifacts, transport.logs], default=str)
    assert f"u-{secret}" not in posted
    assert any(f"u-{secret}" in r.getMessage() for r in caplog.records)  # its operator's


def test_a_refusal_of_the_request_itself_names_what_was_wrong_on_the_api():
    """A check of the request names the request's fields, which the coordinator wrote: those
    words are posted, as is a budget's public reason (without the figures of its message)."""
    from fedrec.sites.process import public_reason
    from models.sites.budget import SiteBudgetError
    from models.sites.encoding import EncodingError

    assert public_reason(RefusedMessage("phase 'x' is not one of the als family's")) == (
        "phase 'x' is not one of the als family's"
    )
    assert public_reason(SchemaError("state: 'factors' has shape (2,)")) == (
        "state: 'factors' has shape (2,)"
    )
    assert public_reason(EncodingError("array 'gram' is float16")) == "array 'gram' is float16"
    budget = SiteBudgetError("spent up to epsilon 9.1 of 10", public="past their cap")
    assert public_reason(budget) == "past their cap"
    assert public_reason(ValueError("3 users")) == (
        "could not compute its answer (ValueError: the site's own log says why)"
    )


def test_a_sites_log_line_on_the_api_leaves_out_what_its_answer_seals(world):
    """The seconds a site took are in its sealed info (the coordinator's); the Prefect API
    line says that it answered and the size of what it uploaded, as the store shows anyway."""
    transport, key, start = world
    request, digest = _ask(transport, family=PLAIN)
    start(allow_exact=True).poll_once()
    _, info = _opened(transport, key, request, digest)
    (line,) = [line for line in transport.logs if "answered train round 1" in line]
    assert info["seconds"] >= 0 and re.fullmatch(
        r"shop-a answered train round 1 and evaluate round-0 \(\d+ bytes up\)", line
    )


def test_a_private_answer_is_counted_on_the_api_without_what_the_sites_users_have_spent(
    world, caplog
):
    """What a charged release leaves a site's users is for the site's operator: the site's own
    log has it, the line on the Prefect API says only that it was counted."""
    transport, _, start = world
    with caplog.at_level(logging.INFO, logger="fedrec.site"):
        _ask(transport, family=PRIVATE)
        start().poll_once()
    (line,) = [line for line in transport.logs if "against its users' budget" in line]
    assert line == "shop-a: counted this full release against its users' budget"
    own = [r.getMessage() for r in caplog.records if "against its users' budget" in r.getMessage()]
    assert len(own) == 1 and re.search(r"this run has spent epsilon [0-9.]+ of it", own[0])


def _own_answer_line(caplog, what: str) -> str:
    (line,) = [
        r.getMessage() for r in caplog.records if f"shop-a answered {what} (" in r.getMessage()
    ]
    return line


def _without_digits_but(line: str, named: list[str]) -> str:
    """The part of ``line`` after its seconds, ``named`` taken out: what is left has no number
    to hold a value."""
    line = line.split(" s; ", 1)[1]
    for part in named:
        line = line.replace(part, "")
    return line


def test_a_sites_own_log_names_what_its_answer_holds_and_the_api_line_does_not(world, caplog):
    """A site's operator audits what left the site in its own log: each array the answer sends
    by name, dtype and shape, and the names of its metrics, evaluation sums and sealed fields,
    none of their values. The line on the Prefect API, which every reader there sees, stays as
    it was: that the site answered and how many bytes it uploaded."""
    transport, key, start = world
    with caplog.at_level(logging.INFO, logger="fedrec.site"):
        request, digest = _ask(transport, family=PLAIN)
        start(allow_exact=True).poll_once()
    data, info = _opened(transport, key, request, digest)
    arrays = decode_arrays(data, max_bytes=10**7)
    update, evaluations = check_answer_arrays(arrays, client_id=1, n_items=len(ITEMS))
    shown = [
        f"{name} {array.dtype}[{'x'.join(str(n) for n in array.shape)}]"
        for name, array in arrays.items()
        if name != "header"
    ]
    assert "array.gram float64[" in " ".join(shown) and update.metrics  # the oracle is not empty

    own = _own_answer_line(caplog, "train round 1 and evaluate round-0")
    assert all(part in own for part in shown)
    names = [*update.metrics, *evaluations["valid"][0], *info]
    assert all(re.search(rf"\b{re.escape(name)}\b", own) for name in names)
    assert not re.search(r"\d", _without_digits_but(own, shown))  # no value, of any field
    for value in [*update.metrics.values(), *evaluations["valid"][0].values(), info["seconds"]]:
        assert repr(value) not in own.split(" s; ", 1)[1]
    (api,) = [line for line in transport.logs if "answered train round 1" in line]
    assert re.fullmatch(r"shop-a answered train round 1 and evaluate round-0 \(\d+ bytes up\)", api)
    assert not any(re.search(rf"\b{re.escape(part)}\b", api) for part in [*shown, *names, "sent"])


def test_a_sites_own_log_names_what_its_enrolment_holds_and_not_its_noisy_count(world, caplog):
    transport, key, start = world
    with caplog.at_level(logging.INFO, logger="fedrec.site"):
        request, digest = _enrol(transport)
        start().poll_once()
    items, info = _enrolment(transport, key, request, digest)
    own = _own_answer_line(caplog, "enroll")
    assert items.size == 0 and "sent: items int64[0]; info " in own
    assert all(re.search(rf"\b{name}\b", own) for name in info)
    assert not re.search(r"\d", _without_digits_but(own, ["int64[0]"]))  # n_users not there
    assert not any("sent" in line or "n_users" in line for line in transport.logs)


def test_a_state_folder_others_could_write_is_refused_before_anything_is_made_in_it(
    world, tmp_path
):
    from models.files import UnsafeFile

    _, _, start = world
    shared = tmp_path / "team"
    shared.mkdir()
    shared.chmod(0o777)
    for state in (shared / "site-a", shared):  # a folder in it, or that folder itself
        with pytest.raises(UnsafeFile, match=rf"reached through {shared}, which every user"):
            start(state_dir=state)
    assert list(shared.iterdir()) == []  # no record, budget or secure-round folder


def test_a_site_signs_that_it_is_up_over_http_and_a_stopped_sign_is_not_overwritten(world):
    """The sign-of-life thread posts a signed sign on its own connection to the Prefect API
    (here a scripted HTTP server on loopback) until it is stopped; once the process has said it
    stopped, no late sign of life overwrites that."""
    import threading
    import time as clock

    from fedrec.sites.transport import alive_variable
    from models.sites.messages import ALIVE, check_alive
    from tests.sites_fakes import scripted_server

    transport, key, start = world
    with scripted_server() as api:
        site = start(prefect_api=f"{api.url}/api", mlflow=api.url)
        stop = threading.Event()
        thread = threading.Thread(target=site._signs_of_life, args=(stop,), daemon=True)
        thread.start()
        path = f"/api/variables/name/{alive_variable('shop-a')}"
        deadline = clock.monotonic() + 10
        while not api.seen and clock.monotonic() < deadline:
            clock.sleep(0.02)
        stop.set()
        thread.join(timeout=5)
    ((method, posted_to, body),) = api.seen[:1]
    assert (method, posted_to) == ("PATCH", path) and not thread.is_alive()
    sign = open_message(json.loads(body)["value"], key.public_key(), ALIVE)
    assert check_alive(sign, "shop-a")[1:] == (30.0, False)

    site.sign_of_life(transport, stopped=True)
    site.sign_of_life(transport)  # a late one from the thread: ignored
    final = open_message(transport.variables[alive_variable("shop-a")], key.public_key(), ALIVE)
    assert check_alive(final, "shop-a")[2] is True


def test_a_site_on_a_torn_budget_ledger_does_not_start_and_a_running_one_says_why(
    world, tmp_path, caplog
):
    """The weak version: with half a JSON line at the end of ``<state-dir>/budget/
    entries.jsonl`` (a crash mid-write) the site started as usual, then refused every private
    request with ``could not compute its answer (JSONDecodeError ...)``, its own log saying only
    ``Unterminated string starting at: line 1 column 77 (char 76)``. It now refuses to start,
    in one line naming the file, the line and the repair; a site that was already running when
    the line was torn refuses each request with the budget's public reason on the API and that
    line in its own log."""
    from fedrec.cli_errors import UserError, classify

    transport, key, start = world
    site = start()
    _ask(transport, family=PRIVATE, nonce="1")
    site.poll_once()
    path = tmp_path / "state" / "budget" / "entries.jsonl"
    line = path.read_text().splitlines()[-1]
    with path.open("a") as out:
        out.write(line[: len(line) // 2])
    expected = (
        f"{path}, line 2: not a whole entry of this site's privacy budget (a write cut short by "
        "a crash, or an edit), so what its users have spent cannot be counted; refused rather "
        "than reset or under-counted: restore the file from a backup, or remove that line by "
        "hand (what it charged is then no longer counted)"
    )

    with pytest.raises(ValueError) as refused:
        start()  # a restart
    shown = classify(refused.value)
    assert isinstance(shown, UserError) and str(shown) == expected

    with caplog.at_level(logging.WARNING, logger="fedrec.site"):
        request, _ = _ask(transport, family=PRIVATE, round_=2, nonce="2")
        site.poll_once()
    assert _refusal(transport, key, request) == (
        "privacy budget of this site: its ledger cannot be read (the site's own log says why): "
        "refused"
    )
    assert any(r.getMessage().endswith(expected) for r in caplog.records)


@pytest.mark.parametrize(
    ("data", "given", "declared"),
    [
        ("ratings.csv", (0.5, 10.0), (0.5, 10.0)),  # a table: the operator's --rating-scale
        ("ratings.csv", None, None),  # --rating-scale data: a value of the rows, not declared
        ("ml-100k", (0.5, 10.0), (1.0, 5.0)),  # a MovieLens folder: its own scale, options unread
    ],
)
def test_the_declared_rating_scale_is_the_operators_for_a_table_and_the_files_for_movielens(
    tmp_path, data, given, declared
):
    from pathlib import Path

    from fedrec.sites.process import _declared_scale

    rows = pd.DataFrame({"user": ["u1", "u2"], "item": ["a", "b"], "rating": [4.0, 2.0]})
    read = encode_interactions(rows, rating_scale=(1.0, 5.0), source=data)
    options = SiteOptions(
        name="shop-a", data=str(tmp_path / data), prefect_api="", mlflow="",
        identity=Path("id.key"), coordinator_key="", state_dir=tmp_path,
        read_options={"rating_scale": given},
    )  # fmt: skip

    assert _declared_scale(options, read) == declared


def test_a_site_without_ratings_says_so_when_it_starts_and_one_with_ratings_does_not(
    world, tmp_path, caplog
):
    import threading

    _, _, start = world
    path = _site_file(tmp_path, "c-norating.csv", _rows().rename(columns={"rating": "score"}))
    reads = SITE_READS | {"rating_scale": (1.0, 5.0)}
    stopped = threading.Event()
    stopped.set()  # run() says what it serves, then stops at once

    with caplog.at_level(logging.INFO, logger="fedrec.site"):
        start(data=path, read_options=reads, events=False).run(stopped)
        start(state_dir=tmp_path / "rated", events=False).run(stopped)

    lines = [r.getMessage() for r in caplog.records if r.name == "fedrec.site"]
    assert [line for line in lines if "has no rating column" in line] == [
        "shop-a: c-norating.csv has no rating column ('rating'): its rows are implicit "
        "feedback, and it refuses runs of a rating model (explicit feedback)"
    ]
    assert sum(line == "shop-a: stopped" for line in lines) == 2  # both ran
