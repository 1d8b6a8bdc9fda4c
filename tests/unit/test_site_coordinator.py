"""The coordinator's acceptance of a site's answer: only a signed answer by the site asked, to
exactly the request asked, with arrays stored where it was told, is used; each refusal says why
in one line."""

from dataclasses import replace

import numpy as np
import pytest

from fedrec.sites.coordinator import Coordinator, SiteRefused
from models.privacy.identity import generate_identity
from models.protocol import ClientUpdate, answer_arrays
from models.sites.encoding import encode_arrays
from models.sites.messages import (
    ANSWER,
    REFUSAL,
    RefusedMessage,
    RoundRequest,
    answer_for,
    body_digest,
    refusal_fields,
    sign_message,
)
from models.sites.registry import Registry, SiteSpec
from models.sites.sealing import seal_answer, sealing_context
from tests.sites_fakes import MemoryTransport

KEYS = {name: generate_identity() for name in ("coordinator", "shop-a", "shop-b", "stranger")}
SITES = tuple(SiteSpec(n, i, KEYS[n].public_key()) for i, n in enumerate(("shop-a", "shop-b")))
SPLIT = {"method": "random", "valid_fraction": 0.1, "test_fraction": 0.1}


@pytest.fixture
def link():
    registry = Registry(KEYS["coordinator"], SITES)
    return Coordinator(registry, MemoryTransport(), "run-1", 0, SPLIT, n_items=5)


def _request(round_: int = 2, nonce: str = "a" * 32) -> RoundRequest:
    return RoundRequest(
        run="run-1",
        kind="train",
        phase="train",
        round=round_,
        label="",
        site="shop-a",
        client_id=0,
        nonce=nonce,
        issued_at=0.0,
        expires_at=1e12,
        reply_to=f"fedrec-sites/run-1/train-train-r{round_:04d}/{nonce}",
        seed=0,
        split=SPLIT,
    )


def _signed_answer(link, request, *, signer="shop-a", site=None, path=None, digest=None):
    update = ClientUpdate(0, np.array([1, 3]), np.array([2, 1]), {"rhs": np.ones((2, 2))})
    data = encode_arrays(answer_arrays(update, {}))
    sealed = seal_answer(data, {}, link.answer_secret.public_key(), sealing_context(request))
    ref = link.transport.put_blob(path or f"{request.reply_to}/shop-a-x.sealed", sealed)
    answer = answer_for(request, digest or body_digest({"r": request.nonce}), ref)
    fields = answer.fields() | ({"site": site} if site else {})
    return sign_message(KEYS[signer], ANSWER, fields)


def _accept(link, request, signed):
    return link._accept(SITES[0], request, body_digest({"r": request.nonce}), signed)


def test_a_genuine_answer_is_accepted(link):
    request = _request()
    arrays, answer = _accept(link, request, _signed_answer(link, request))
    assert answer.site == "shop-a" and set(arrays) == {"header", "items", "counts", "array.rhs"}


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (dict(signer="stranger"), "signature does not verify"),  # a wrong key for shop-a
        (dict(signer="shop-b"), "signature does not verify"),  # another site's key
        (dict(signer="stranger", site="shop-x"), "unknown site 'shop-x'"),
        (
            dict(signer="shop-b", site="shop-b"),
            "sent by site 'shop-b', the request was to 'shop-a'",
        ),
        (dict(path="fedrec-sites/run-1/elsewhere/x.npz"), "outside its reply folder"),
        (dict(digest="0" * 64), "request digest differs"),
    ],
)
def test_a_forged_or_misdirected_answer_is_refused_with_its_reason(link, forge, reason):
    request = _request()
    with pytest.raises(RefusedMessage, match=reason):
        _accept(link, request, _signed_answer(link, request, **forge))


def test_a_replayed_answer_of_another_round_or_request_is_refused(link):
    old = _request(round_=1, nonce="b" * 32)
    replayed = _signed_answer(link, old)
    with pytest.raises(RefusedMessage, match="answer for round 1, the request was for 2"):
        _accept(link, _request(round_=2, nonce="b" * 32), replayed)
    with pytest.raises(RefusedMessage, match="answer for nonce"):
        _accept(link, replace(old, nonce="c" * 32), replayed)


def test_an_answer_whose_bytes_changed_after_signing_is_refused(link):
    request = _request()
    signed = _signed_answer(link, request)
    link.transport.blobs[signed["body"]["answer"]["path"]] = b"tampered"
    with pytest.raises(ValueError, match="sha256 differs"):
        _accept(link, request, signed)


def test_a_signed_refusal_ends_the_wait_with_the_site_reason(link):
    request = _request()
    refusal = sign_message(KEYS["shop-a"], REFUSAL, refusal_fields(request, "state has NaN"))
    with pytest.raises(SiteRefused, match="shop-a refused train round 2: state has NaN"):
        _accept(link, request, refusal)


def test_a_blob_the_store_does_not_have_is_one_transport_error_not_a_crash():
    """A 404 on a streamed download raised httpx's ResponseNotRead from the error's own
    message (a site's traceback, for a request whose exchange files were pruned)."""
    import http.server
    import threading

    from fedrec.sites.transport import Transport, TransportError
    from models.sites.messages import BlobRef

    class Missing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.send_header("Content-Length", "12")
            self.end_headers()
            self.wfile.write(b"no such file")

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Missing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    ref = BlobRef.of("fedrec-sites/run-1/catalogue.npz", b"items")
    try:
        with Transport(f"{url}/api", url) as transport:
            with pytest.raises(TransportError) as err:
                transport.get_blob(ref, 1000)
            with pytest.raises(TransportError) as prefect:
                transport.post_log(name="fedrec.site", message="-", flow_run_id="", task_run_id="")
    finally:
        server.shutdown()
    assert str(err.value) == "downloading fedrec-sites/run-1/catalogue.npz: HTTP 404 "
    assert err.value.mlflow and not prefect.value.mlflow  # which server a site should check


@pytest.mark.parametrize(
    "arrays",
    [
        {"message": np.arange(4, dtype=np.uint8), "extra": np.zeros(2)},  # more than the message
        {"message": np.arange(4, dtype=np.int64)},
        {"message": np.arange(4, dtype=np.uint8).reshape(2, 2)},
        {"header": np.arange(4, dtype=np.uint8)},
    ],
)
def test_a_secure_steps_answer_is_one_byte_array_or_refused(link, monkeypatch, arrays):
    """A secure step's verified answer is taken as the site's protocol message only when it
    holds that one flat byte array and nothing else."""
    from fedrec.sites.secure import registry_field
    from models.privacy.secagg_plus import RoundConfig
    from models.sites.schema import SchemaError

    config = RoundConfig("run-1", 1, 2, 8, 2, 30)
    monkeypatch.setattr(link, "exchange", lambda *_, **__: (arrays, None))
    with pytest.raises(SchemaError, match="shop-a: a secure step's answer must be one byte array"):
        link.secure_step(SITES[0], "share", config, b"directory")
    asked = []
    honest = {"message": np.frombuffer(b"masked", dtype=np.uint8)}
    monkeypatch.setattr(link, "exchange", lambda *a, **kw: asked.append((a, kw)) or (honest, None))
    assert link.secure_step(SITES[0], "share", config, b"directory") == b"masked"
    ((site,), fields) = asked[0]  # the step's request: its round's configuration and keys
    assert site == SITES[0] and fields == {
        "kind": "secagg",
        "phase": "share",
        "round_": 1,
        "secure": {"registry": registry_field({s.client_id: s.public_key for s in SITES}),
                   "round": config.to_json()},
        "message": b"directory",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("age", "gone"),
    [
        (1.0, False),
        (100.0, False),  # late by more than one interval and the clock skew: still up
        (149.0, False),  # three intervals of 30 s and the 60 s skew allowed
        (160.0, True),
        (3600.0, True),
    ],
)
def test_a_site_is_down_when_its_last_sign_of_life_is_three_intervals_and_the_skew_old(
    link, monkeypatch, age, gone
):
    """Read first 45 s earlier (one interval of 30 s and a look of 15 s): a stale sign read
    for the first time is not yet believed, since a live process replaces it within 30 s."""
    from fedrec.sites.transport import alive_variable
    from models.sites.messages import ALIVE, alive_fields

    clock = [1e9 - 45]
    monkeypatch.setattr("fedrec.sites.coordinator.time.time", lambda: clock[0])
    sign = sign_message(KEYS["shop-a"], ALIVE, alive_fields("shop-a", 1e9 - age, 30.0))
    link.transport.variables[alive_variable("shop-a")] = sign
    assert link.liveness(SITES[0]) == (None, True)  # first read
    clock[0] = 1e9
    why, signed = link.liveness(SITES[0])
    assert signed and (why is not None) == gone
    if gone:
        assert why.endswith(f"{age:.0f} s ago (its process signs one every 30 s): is the "
                            "site's process down?")  # fmt: skip


def test_a_state_asked_of_many_sites_is_uploaded_once(link):
    """Every site of a round is sent the same global state: one upload, one reference; another
    state object is uploaded again, under its own content's name."""
    from models.mf.family import ExplicitMF
    from models.mf.federated import MFConfig

    family = ExplicitMF(MFConfig(n_factors=2))
    uploads, upload = [], link.transport.put_blob
    link.transport.put_blob = lambda path, data: uploads.append(path) or upload(path, data)
    state = family.initial_state(5, seed=0)
    refs = [link.publish_state(family, state) for _ in range(3)]
    assert refs[0] == refs[1] == refs[2] and uploads == [refs[0].path]
    other = link.publish_state(family, family.initial_state(5, seed=1))
    assert other.sha256 != refs[0].sha256 and uploads == [refs[0].path, other.path]
    assert other.path.endswith(f"/state-{other.sha256[:16]}.npz")
