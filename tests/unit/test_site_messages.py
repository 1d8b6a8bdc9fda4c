"""Signed site manifests: what verifies, and each way a manifest is refused."""

import base64
import json
import math

import pytest

from models.privacy.identity import generate_identity
from models.sites.messages import (
    ANSWER,
    MAX_MANIFEST_BYTES,
    REQUEST,
    BlobRef,
    RefusedMessage,
    RoundRequest,
    answer_for,
    body_digest,
    canonical,
    check_answer,
    check_request,
    manifest_bytes,
    open_message,
    sign_message,
)
from models.sites.sealing import answer_key_field, new_answer_key

NOW = 1_700_000_000.0
COORDINATOR, SITE, OTHER = generate_identity(), generate_identity(), generate_identity()
SHA = "ab" * 32
SPLIT = {"method": "random", "valid_fraction": 0.1, "test_fraction": 0.1}
ANSWER_KEY = answer_key_field(new_answer_key())


def _request(**changes) -> RoundRequest:
    fields = dict(
        run="run-1",
        kind="train",
        phase="train",
        round=3,
        label="",
        site="shop-a",
        client_id=0,
        nonce="0" * 31 + "1",
        issued_at=NOW,
        expires_at=NOW + 600,
        reply_to="fedrec-sites/run-1/x",
        seed=7,
        split={"method": "random", "valid_fraction": 0.1, "test_fraction": 0.1},
        family={"name": "explicit"},
        state=BlobRef("fedrec-sites/run-1/s.npz", SHA, 10),
        catalogue=BlobRef("fedrec-sites/run-1/c.npz", SHA, 10),
        eval_splits=("valid",),
        answer_key=ANSWER_KEY,
    )
    return RoundRequest(**(fields | changes))


def _signed(request: RoundRequest, key=COORDINATOR) -> dict:
    return sign_message(key, REQUEST, request.fields())


def test_a_signed_request_verifies_and_reads_back_equal():
    signed = _signed(_request())
    body = open_message(manifest_bytes(signed), COORDINATOR.public_key(), REQUEST)
    assert check_request(body, site="shop-a", now=NOW + 1) == _request()


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda s: s["body"].__setitem__("round", 4), "signature does not verify"),
        # the key the site seals its answer to: one of an eavesdropper's is not the run's
        (lambda s: s["body"].__setitem__("answer_key", "B" * 43 + "="), "does not verify"),
        (lambda s: s["body"].__setitem__("domain", "fedrec/secagg/v1"), "domain"),
        (lambda s: s["body"].__setitem__("purpose", ANSWER), "purpose"),
        (lambda s: s.__setitem__("sig", base64.b64encode(b"x" * 64).decode()), "does not verify"),
        (lambda s: s.__setitem__("sig", "not base64!"), "not base64"),
        (lambda s: s.__setitem__("extra", 1), "expected ['body', 'sig']"),
        (lambda s: s.__setitem__("body", [1]), "body must be an object and sig a base64 string"),
        (lambda s: s.__setitem__("sig", 5), "body must be an object and sig a base64 string"),
    ],
)
def test_a_tampered_manifest_is_refused_with_its_reason(tamper, reason):
    signed = json.loads(manifest_bytes(_signed(_request())))
    tamper(signed)
    with pytest.raises(RefusedMessage, match=reason.replace("[", r"\[").replace("]", r"\]")):
        open_message(signed, COORDINATOR.public_key(), REQUEST)


def test_a_request_signed_by_another_key_is_refused():
    with pytest.raises(RefusedMessage, match="does not verify against key"):
        open_message(_signed(_request(), OTHER), COORDINATOR.public_key(), REQUEST)


@pytest.mark.parametrize(
    ("request_", "site", "now", "reason"),
    [
        (_request(), "shop-b", NOW, "is for site 'shop-a', this is 'shop-b'"),
        (_request(expires_at=NOW - 120), "shop-a", NOW, "expired 120 s ago"),
        (_request(issued_at=NOW + 3600), "shop-a", NOW, "issued 3600 s in the future"),
        (_request(nonce="xyz"), "shop-a", NOW, "nonce"),
        (_request(reply_to="../etc"), "shop-a", NOW, "not a safe relative path"),
        (_request(kind="exec"), "shop-a", NOW, "kind 'exec'"),
        (_request(eval_splits=("users",)), "shop-a", NOW, "eval_splits"),
        (_request(state=None), "shop-a", NOW, "needs a state and a catalogue"),
    ],
)
def test_a_request_for_another_site_or_out_of_date_is_refused(request_, site, now, reason):
    body = open_message(_signed(request_), COORDINATOR.public_key(), REQUEST)
    with pytest.raises(RefusedMessage, match=reason):
        check_request(body, site=site, now=now)


def test_a_request_without_an_answer_key_is_refused():
    """A coordinator of a version before sealed answers: the site would have to answer in the
    clear, readable by every other site."""
    fields = _request().fields()
    del fields["answer_key"]
    body = open_message(
        sign_message(COORDINATOR, REQUEST, fields), COORDINATOR.public_key(), REQUEST
    )
    with pytest.raises(RefusedMessage, match=r"request lacks fields \['answer_key'\]"):
        check_request(body, site="shop-a", now=NOW)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"round": 1.5}, "field round must be an integer >= 0"),
        ({"round": -1}, "field round must be an integer >= 0"),
        ({"client_id": True}, "field client_id must be an integer >= 0"),
        ({"seed": "7"}, "field seed must be an integer >= 0"),
        ({"state": BlobRef("a/s.npz", SHA, 2.5)}, "state.bytes 2.5 must be"),
        ({"split": {"method": "random", "valid_fraction": 0.1}}, "split must hold method"),
        ({"split": SPLIT | {"users": [1, 2]}}, "split must hold method"),
        ({"split": SPLIT | {"method": "by-user"}}, "is not a valid split"),
        ({"split": SPLIT | {"valid_fraction": 1.0}}, "is not a valid split"),
        ({"split": SPLIT | {"test_fraction": -0.1}}, "is not a valid split"),
        ({"split": SPLIT | {"test_fraction": "0.1"}}, "is not a valid split"),
        ({"split": SPLIT | {"positive_threshold": "4"}}, "is not a valid split"),
        ({"devices": 0}, r"devices 0 must be in \(0, 1\]"),  # the users' sampling rate
        ({"devices": 1.5}, r"devices 1\.5 must be in \(0, 1\]"),
        ({"devices": -0.5}, "must be in"),
        ({"devices": "0.5"}, "must be in"),
        ({"release": {"noise_multiplier": "7"}}, "release must be an object of numbers"),
        ({"release": [7.0]}, "release must be an object of numbers"),
        ({"secure": {"registry": {}, "keys": {}}}, "secure must be an object of registry"),
        ({"secure": ["registry"]}, "secure must be an object of registry"),
        ({"kind": "secagg", "phase": "mask"}, "a secagg request needs its secure round"),
        ({"kind": "secagg", "secure": {"registry": {}}}, "needs its secure round"),
        ({"epsilon": 1.0}, "epsilon 1.0; allowed: a positive number, on an enrolment only"),
        ({"kind": "enroll", "phase": "private", "epsilon": 0}, "epsilon 0; allowed: a positive"),
        ({"kind": "enroll", "phase": "private", "epsilon": "8"}, "epsilon '8'; allowed"),
        (
            {"rating_scale": (1.0, 5.0)},
            r"rating_scale \[1\.0, 5\.0\] on a train request; allowed: on an enrolment only",
        ),
        ({"kind": "enroll", "phase": "exact", "rating_scale": (5, 1)}, "rating_scale \\[5, 1\\]"),
        ({"kind": "enroll", "phase": "exact", "rating_scale": (3, 3)}, "rating_scale \\[3, 3\\]"),
        ({"kind": "enroll", "phase": "exact", "rating_scale": (1, 5, 9)}, "allowed: LOW,HIGH"),
        ({"kind": "enroll", "phase": "exact", "rating_scale": ("1", 5)}, "allowed: LOW,HIGH"),
        ({"kind": "enroll", "phase": "exact", "rating_scale": "1,5"}, "allowed: LOW,HIGH"),
        ({"answer_key": ""}, "answer_key must be base64 of a 32-byte X25519 public key"),
        ({"answer_key": ANSWER_KEY[:-2] + "=="}, "answer_key must be base64 of a 32-byte"),
        ({"answer_key": 7}, "answer_key must be base64 of a 32-byte"),
    ],
)
def test_a_request_with_a_field_out_of_its_range_is_refused(changes, reason):
    request = _request(**changes)
    body = open_message(_signed(request), COORDINATOR.public_key(), REQUEST)
    with pytest.raises(RefusedMessage, match=reason):
        check_request(body, site="shop-a", now=NOW)


@pytest.mark.parametrize(
    "changes",
    [
        {"devices": 0.5},
        {"devices": 1},
        {"split": SPLIT | {"valid_fraction": 0, "test_fraction": 0.0}},
        {"split": SPLIT | {"method": "temporal", "positive_threshold": 4.0}},
        {"release": {"noise_multiplier": 2.0}},
        {"secure": {"registry": {"0": "a2V5"}, "round": {"threshold": 2}}, "kind": "secagg"},
        {"kind": "enroll", "phase": "private", "epsilon": 0.5},
        {"kind": "enroll", "phase": "exact", "rating_scale": (0.5, 5.0)},
        {"kind": "enroll", "phase": "exact", "rating_scale": "data"},
    ],
)
def test_a_request_with_its_optional_fields_in_range_reads_back(changes):
    request = _request(**changes)
    body = open_message(_signed(request), COORDINATOR.public_key(), REQUEST)
    assert check_request(body, site="shop-a", now=NOW) == request


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("expires_at", math.inf),  # what a manifest's 1e999 reads as: a request that never expires
        ("expires_at", "soon"),
        ("issued_at", True),
        ("issued_at", math.nan),
    ],
)
def test_a_request_whose_times_are_not_finite_numbers_is_refused(name, value):
    body = _signed(_request())["body"] | {name: value}
    with pytest.raises(RefusedMessage, match=f"request field {name} must be a finite number"):
        check_request(body, site="shop-a", now=NOW)


def test_a_request_with_an_unknown_field_is_refused():
    body = _signed(_request())["body"] | {"command": "rm -rf /"}
    with pytest.raises(RefusedMessage, match=r"unknown fields \['command'\]"):
        check_request(body, site="shop-a", now=NOW)


def test_nan_is_refused_when_signing_and_when_reading():
    with pytest.raises(RefusedMessage, match="not canonical JSON"):
        sign_message(COORDINATOR, REQUEST, {"x": float("nan")})
    raw = b'{"body": {"x": NaN}, "sig": ""}'
    with pytest.raises(RefusedMessage, match="NaN"):
        open_message(raw, COORDINATOR.public_key(), REQUEST)


def test_an_oversized_manifest_is_refused_before_parsing():
    raw = b"{" + b" " * MAX_MANIFEST_BYTES + b"}"
    with pytest.raises(RefusedMessage, match=f"the limit is {MAX_MANIFEST_BYTES}"):
        open_message(raw, COORDINATOR.public_key(), REQUEST)


def test_an_answer_must_name_exactly_the_request_it_answers():
    request = _request()
    digest = body_digest(_signed(request)["body"])
    ref = BlobRef("fedrec-sites/run-1/x/a.npz", SHA, 5)
    answer = answer_for(request, digest, ref, {"seconds": 0.5})
    body = open_message(sign_message(SITE, ANSWER, answer.fields()), SITE.public_key(), ANSWER)
    assert check_answer(body, request, digest) == answer
    for name, value in [("round", 2), ("run", "run-0"), ("nonce", "f" * 32), ("site", "shop-b")]:
        with pytest.raises(RefusedMessage, match=f"answer for {name}"):
            check_answer(body | {name: value}, request, digest)
    with pytest.raises(RefusedMessage, match="request digest differs"):
        check_answer(body, request, "0" * 64)
    for info in ({"users": [1, 2]}, {"users": None}, {"seconds": math.inf}, ["seconds"]):
        with pytest.raises(
            RefusedMessage, match="info must be an object of numbers and short tokens"
        ):
            check_answer(body | {"info": info}, request, digest)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"path": "fedrec-sites/../../etc/passwd"}, "is not a safe relative path"),
        ({"path": ".."}, "is not a safe relative path"),
        ({"path": "fedrec-sites/run 1/a.npz"}, "is not a safe relative path"),
        ({"path": 7}, "is not a safe relative path"),
        ({"path": "/etc/passwd"}, "must be relative"),
        ({"sha256": "AB" * 32}, "sha256 is not 64 lowercase hex digits"),
        ({"bytes": -1}, r"bytes -1 must be an integer >= 0"),
        ({"bytes": "10"}, r"bytes '10' must be an integer >= 0"),
        ({"bytes": True}, r"bytes True must be an integer >= 0"),
        ({"extra": 1}, "must be an object with path, sha256 and bytes"),
    ],
)
def test_a_blob_reference_outside_the_store_or_of_a_bad_size_is_refused(changes, reason):
    raw = {"path": "fedrec-sites/run-1/./a.npz", "sha256": SHA, "bytes": 0}
    assert BlobRef.from_json(raw, "state") == BlobRef(raw["path"], SHA, 0)  # the valid one
    with pytest.raises(RefusedMessage, match=reason):
        BlobRef.from_json(raw | changes, "state")


def test_canonical_bytes_do_not_depend_on_key_order():
    assert canonical({"b": 1, "a": [1.5, "x"]}) == b'{"a":[1.5,"x"],"b":1}'


BODY = {"run": "r", "round": 0, "site": "a", "nonce": "0f" * 16}


@pytest.mark.parametrize("change", [{}, {"run": "x"}, {"run": "x" * 100}, {"round": 7}])
def test_a_refused_body_that_names_its_request_well_gives_a_refusal(change):
    from models.sites.messages import refusal_of_body

    assert refusal_of_body(BODY | change, " a field\n out of range ") == (
        BODY | change | {"reason": "a field out of range"}
    )


@pytest.mark.parametrize(
    "change",
    [{"run": ""}, {"run": "x" * 101}, {"run": 7}, {"round": -1}, {"round": 1.5},
     {"round": True}, {"site": 3}, {"nonce": "0F" * 16}, {"nonce": 5}],
)  # fmt: skip
def test_a_refused_body_that_does_not_name_its_request_well_gives_none(change):
    from models.sites.messages import refusal_of_body

    assert refusal_of_body(BODY | change, "why") is None


def test_a_notice_about_an_unverified_request_needs_a_request_body():
    from models.sites.messages import unverified_fields

    expects = COORDINATOR.public_key()
    fields = unverified_fields({"body": BODY | {"purpose": REQUEST}}, "why", expects)
    assert fields is not None and fields["reason"] == "why" and fields["run"] == "r"
    assert unverified_fields({"body": BODY | {"purpose": ANSWER}}, "why", expects) is None
    assert unverified_fields({"body": [BODY]}, "why", expects) is None


@pytest.mark.parametrize(
    "change",
    [{"every": 0}, {"every": -1.0}, {"at": "5"}, {"every": "2"}, {"stopped": "no"},
     {"stopped": None}],
)  # fmt: skip
def test_a_sign_of_life_needs_numbers_at_and_every_above_zero_and_a_bool(change):
    from models.sites.messages import alive_fields, check_alive

    body = alive_fields("a", 5.0, 2.0)
    assert check_alive(body, "a") == (5.0, 2.0, False)
    with pytest.raises(RefusedMessage, match="a sign of life needs numbers at and every > 0"):
        check_alive(body | change, "a")
