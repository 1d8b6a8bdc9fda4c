"""Signed site manifests: what verifies, and each way a manifest is refused."""

import base64
import json

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

NOW = 1_700_000_000.0
COORDINATOR, SITE, OTHER = generate_identity(), generate_identity(), generate_identity()
SHA = "ab" * 32


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
        (lambda s: s["body"].__setitem__("domain", "fedrec/secagg/v1"), "domain"),
        (lambda s: s["body"].__setitem__("purpose", ANSWER), "purpose"),
        (lambda s: s.__setitem__("sig", base64.b64encode(b"x" * 64).decode()), "does not verify"),
        (lambda s: s.__setitem__("sig", "not base64!"), "not base64"),
        (lambda s: s.__setitem__("extra", 1), "expected ['body', 'sig']"),
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
        (_request(issued_at=NOW + 3600), "shop-a", NOW, "in the future"),
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


def test_canonical_bytes_do_not_depend_on_key_order():
    assert canonical({"b": 1, "a": [1.5, "x"]}) == b'{"a":[1.5,"x"],"b":1}'
