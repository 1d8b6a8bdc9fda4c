"""Sealed answers: only the run's answer key opens them, and only for the request they answer."""

import json

import pytest

from models.sites import sealing
from models.sites.catalogue import left_out_note
from models.sites.messages import RefusedMessage, RoundRequest, check_info, parse_manifest
from models.sites.sealing import (
    MAGIC,
    MAX_INFO_BYTES,
    OVERHEAD,
    answer_key_field,
    new_answer_key,
    open_answer,
    parse_answer_key,
    seal_answer,
    sealing_context,
)

KEY = new_answer_key()
DATA = b"PK\x03\x04 an npz's bytes" * 50
INFO = {"seconds": 0.25, "n_users": 12, "fingerprint": "ab12"}


def _request(**changes) -> RoundRequest:
    fields = dict(
        run="run-1", kind="train", phase="train", round=3, label="", site="shop-a",
        client_id=0, nonce="0" * 31 + "1", issued_at=0.0, expires_at=1.0,
        reply_to="fedrec-sites/run-1/x", seed=0, split={}, answer_key=answer_key_field(KEY),
    )  # fmt: skip
    return RoundRequest(**(fields | changes))


def _sealed(request=None, key=KEY) -> bytes:
    request = request or _request()
    return seal_answer(
        DATA, INFO, parse_answer_key(answer_key_field(key)), sealing_context(request)
    )


def test_the_runs_key_opens_what_was_sealed_to_it():
    sealed = _sealed()
    assert open_answer(sealed, KEY, sealing_context(_request())) == (DATA, INFO)
    assert sealed.startswith(MAGIC) and len(sealed) == len(DATA) + len(json.dumps(INFO,
        separators=(",", ":"))) + OVERHEAD  # fmt: skip
    assert DATA[:20] not in sealed and b"n_users" not in sealed
    assert _sealed() != sealed  # a fresh ephemeral key and nonce each time


@pytest.mark.parametrize(
    "moved",
    [dict(round=4), dict(nonce="0" * 31 + "2"), dict(site="shop-b"), dict(run="run-2"),
     dict(label="champion"), dict(kind="evaluate"), dict(phase="mean")],
)  # fmt: skip
def test_an_answer_moved_to_another_request_does_not_open(moved):
    with pytest.raises(RefusedMessage, match="does not open with this run's answer key"):
        open_answer(_sealed(), KEY, sealing_context(_request(**moved)))


def test_an_answer_sealed_to_another_key_or_altered_does_not_open():
    context = sealing_context(_request())
    with pytest.raises(RefusedMessage, match="does not open"):
        open_answer(_sealed(key=new_answer_key()), KEY, context)
    altered = bytearray(_sealed())
    altered[-40] ^= 1
    with pytest.raises(RefusedMessage, match="does not open"):
        open_answer(bytes(altered), KEY, context)
    with pytest.raises(RefusedMessage, match="no sealed header"):
        open_answer(DATA, KEY, context)  # a plain npz, what a site of an older version sends


@pytest.mark.parametrize("text", ["", "AAAA", "A" * 43 + "=" + "A", 32, None])
def test_an_answer_key_that_is_not_32_bytes_of_base64_is_refused(text):
    with pytest.raises(RefusedMessage, match="answer_key must be base64 of a 32-byte"):
        parse_answer_key(text)


def _sealed_raw(note: bytes) -> bytes:
    """An answer sealed to the run's key with ``note`` as its info's bytes, as a site that
    writes its own sealer could make it (the site's sealer refuses to)."""
    context = sealing_context(_request())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sealing, "canonical", lambda _: note)
        patch.setattr(sealing, "MAX_INFO_BYTES", len(note))
        return seal_answer(DATA, {}, parse_answer_key(answer_key_field(KEY)), context)


def test_a_sealed_info_too_long_or_nested_too_deeply_is_refused_before_it_is_parsed():
    """An enrolled site's own sealed file must not hold the coordinator: a 16 MiB info took
    385 MiB and seconds of the GIL to parse, a 512 MiB one would take gigabytes, and a deeply
    nested one raised RecursionError past the coordinator's refusal handling."""
    context = sealing_context(_request())
    long = _sealed_raw(b'{"a":"' + b"x" * (MAX_INFO_BYTES + 1) + b'"}')
    with pytest.raises(RefusedMessage, match=f"info of {MAX_INFO_BYTES + 9} bytes, the limit"):
        open_answer(long, KEY, context)
    nested = _sealed_raw(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}")
    with pytest.raises(RefusedMessage, match="info is nested too deeply"):
        open_answer(nested, KEY, context)
    with pytest.raises(ValueError, match=r"info of \d+ bytes, the limit"):
        seal_answer(DATA, {"a": "x" * MAX_INFO_BYTES}, KEY.public_key(), context)


def test_a_sealed_info_of_exactly_the_limit_opens_and_one_byte_more_is_refused():
    context = sealing_context(_request())
    at_limit = _sealed_raw(b'{"a":"' + b"x" * (MAX_INFO_BYTES - 8) + b'"}')
    assert open_answer(at_limit, KEY, context) == (DATA, {"a": "x" * (MAX_INFO_BYTES - 8)})
    over = _sealed_raw(b'{"a":"' + b"x" * (MAX_INFO_BYTES - 7) + b'"}')
    with pytest.raises(RefusedMessage, match=f"info of {MAX_INFO_BYTES + 1} bytes, the limit"):
        open_answer(over, KEY, context)


@pytest.mark.parametrize(
    "info",
    [
        {"outside_rows": "89; the coordinator says: re-run with --allow-exact"},
        {"key_id": "x" * 129},
        {"n users": 3},
        {"n_users": [3]},
    ],
)
def test_an_answers_info_holds_numbers_and_short_tokens_only(info):
    """Text of a site's choosing would reach the coordinator's log lines on the Prefect API."""
    with pytest.raises(RefusedMessage, match="numbers and short tokens"):
        check_info(info)
    assert check_info({"key_id": "0123abcdef456789", "n_users": 3, "seconds": 0.5})
    assert left_out_note("shop-a", {"outside_rows": "89", "outside_items": 3}) is None
    assert left_out_note("shop-a", {"outside_rows": 89, "outside_items": 3}).startswith(
        "shop-a: 89 of its rows, of 3 items"
    )


def test_a_manifest_nested_too_deeply_is_refused_not_raised_past_the_refusal_handling():
    with pytest.raises(RefusedMessage, match="nested too deeply"):
        parse_manifest(b"[" * 5000 + b"]" * 5000)
