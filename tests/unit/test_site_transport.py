"""The HTTP side of a site and its coordinator, against a real HTTP server on loopback that
answers as scripted: what a download accepts (the signed size and sha256, nothing more), which
failures are retried and how each one reads, and the Prefect API's 404s that mean "not there"."""

from __future__ import annotations

import hashlib
import json
import socket

import pytest

from fedrec.sites.transport import Transport, TransportError
from models.sites.messages import BlobRef
from tests.sites_fakes import scripted_server

DATA = bytes(range(256)) * 40  # a state's npz, say: 10,240 bytes


@pytest.fixture
def server():
    with scripted_server() as served:
        yield served


@pytest.fixture
def transport(server):
    with Transport(f"{server.url}/api", server.url, timeout=5.0, attempts=3) as made:
        yield made


BLOB = "/api/2.0/mlflow-artifacts/artifacts/fedrec-sites/run/state.npz"


def test_a_download_is_the_signed_bytes(server, transport):
    server.answer("GET", BLOB, (200, DATA))
    ref = BlobRef.of("fedrec-sites/run/state.npz", DATA)
    assert transport.get_blob(ref, max_bytes=len(DATA)) == DATA  # the cap itself is allowed


def test_a_download_announced_above_the_cap_is_not_even_asked(server, transport):
    ref = BlobRef.of("fedrec-sites/run/state.npz", DATA)
    with pytest.raises(ValueError, match="10240 bytes announced, the limit is 10239"):
        transport.get_blob(ref, len(DATA) - 1)
    assert server.seen == []


@pytest.mark.parametrize(
    ("served", "reason"),
    [
        (DATA + b"x" * 100_000, "longer than the 10240 bytes announced"),  # cut where it passes
        (DATA[:-1] + b"\x00", "sha256 differs from the signed reference"),  # another state
        (DATA[:-1], "sha256 differs from the signed reference"),
    ],
)
def test_bytes_other_than_the_signed_ones_are_refused(server, transport, served, reason):
    """The attack: whoever can write the artifact store (every site can) replaces a global
    state or an answer under its path. The reference a party signed names its size and
    sha256: anything else is refused, and not asked again."""
    server.answer("GET", BLOB, (200, served))
    with pytest.raises(ValueError, match=reason):
        transport.get_blob(BlobRef.of("fedrec-sites/run/state.npz", DATA), 10**6)
    assert len(server.seen) == 1


def test_a_busy_server_is_asked_again_and_a_refusal_is_not(server, transport):
    ref = BlobRef.of("fedrec-sites/run/state.npz", DATA)
    for statuses in [(429, 500), (502, 503), (504,)]:  # two retries of three attempts at most
        server.seen.clear()
        server.answer("GET", BLOB, *[(status, b"busy") for status in statuses], (200, DATA))
        assert transport.get_blob(ref, 10**6) == DATA
        assert len(server.seen) == len(statuses) + 1

    server.seen.clear()
    server.answer("PUT", BLOB, (403, b"no writes here"))
    with pytest.raises(TransportError, match=r"uploading .*: HTTP 403 no writes here") as refused:
        transport.put_blob("fedrec-sites/run/state.npz", DATA)
    assert refused.value.mlflow and len(server.seen) == 1  # the MLflow server's to fix

    server.seen.clear()
    server.answer("POST", "/api/logs/", *[(502, b"")] * 3)
    with pytest.raises(
        TransportError, match=r"posting a log line: HTTP 502 after 3 attempts"
    ) as busy:
        transport.post_log(name="fedrec.site.a", message="m", flow_run_id="", task_run_id="t")
    assert not busy.value.mlflow and len(server.seen) == 3  # the Prefect API's


def test_a_server_that_is_not_there_fails_after_the_attempts_and_names_which(server):
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    prefect_down = Transport(f"{closed}/api", server.url, timeout=5.0, attempts=2)
    with prefect_down, pytest.raises(TransportError, match=r"ConnectError.* after 2") as down:
        prefect_down.get_variable("fedrec-alive-shop-a")
    assert down.value.mlflow is False
    mlflow_down = Transport(f"{server.url}/api", closed, timeout=5.0, attempts=2)
    with mlflow_down, pytest.raises(TransportError, match="after 2 attempts") as down:
        mlflow_down.put_blob("fedrec-sites/run/x.npz", b"x")
    assert down.value.mlflow is True


def test_a_variable_is_created_when_missing_and_read_as_none_when_not_there(server, transport):
    variable = "/api/variables/name/fedrec-alive-shop-a"
    server.answer("GET", variable, (404, {"detail": "not found"}))
    assert transport.get_variable("fedrec-alive-shop-a") is None
    server.answer("GET", variable, (200, {"name": "fedrec-alive-shop-a", "value": {"a": 1}}))
    assert transport.get_variable("fedrec-alive-shop-a") == {"a": 1}

    server.seen.clear()  # missing: created; created by another party in between: updated
    server.answer("PATCH", variable, (404, {}), (204, b""))
    server.answer("POST", "/api/variables/", (409, {}))
    transport.put_variable("fedrec-alive-shop-a", {"b": 2})
    assert [(m, p) for m, p, _ in server.seen] == [
        ("PATCH", variable),
        ("POST", "/api/variables/"),
        ("PATCH", variable),
    ]
    assert [json.loads(body) for _, _, body in server.seen] == [
        {"value": {"b": 2}},
        {"name": "fedrec-alive-shop-a", "value": {"b": 2}},
        {"value": {"b": 2}},
    ]


@pytest.mark.parametrize(
    ("status", "state", "ended"),
    [
        (404, None, False),  # not recorded yet: the server writes task runs in batches
        (200, "RUNNING", False),
        (200, "COMPLETED", True),
        (200, "FAILED", True),
        (200, "CRASHED", True),
        (200, "CANCELLED", True),
    ],
)
def test_a_task_run_has_ended_only_in_a_final_state(server, transport, status, state, ended):
    body = {"id": "t-1", "state": {"type": state}} if state else {"detail": "not found"}
    server.answer("GET", "/api/task_runs/t-1", (status, body))
    assert transport.task_run_ended("t-1") is ended


def test_answers_on_many_task_runs_are_listed_in_one_call(server, transport):
    server.answer("POST", "/api/artifacts/filter", (200, [{"id": "a2"}, {"id": "a1"}]))
    assert transport.answers_on("t-1", "t-2", "t-3") == [{"id": "a2"}, {"id": "a1"}]
    ((method, path, body),) = server.seen
    assert (method, path) == ("POST", "/api/artifacts/filter")
    assert json.loads(body) == {
        "artifacts": {"task_run_id": {"any_": ["t-1", "t-2", "t-3"]},
                      "type": {"any_": ["fedrec-answer"]}},
        "sort": "CREATED_DESC",
        "limit": 200,
    }  # fmt: skip
    server.answer("POST", "/api/artifacts/filter", (200, {"detail": "not a list"}))
    assert transport.requests_for("shop-a") == []


def test_an_upload_is_named_by_what_was_sent(server, transport):
    ref = transport.put_blob("fedrec-sites/run/state.npz", DATA)
    assert (ref.path, ref.bytes, ref.sha256) == (
        "fedrec-sites/run/state.npz",
        len(DATA),
        hashlib.sha256(DATA).hexdigest(),
    )
    assert server.seen == [("PUT", BLOB, DATA)]


def test_a_log_line_goes_to_the_task_run_it_names(server, transport):
    transport.post_log(name="fedrec.site.shop-a", message="shop-a answered train round 1",
                       flow_run_id="", task_run_id="t-1", level=30)  # fmt: skip
    ((method, path, body),) = server.seen
    (line,) = json.loads(body)
    assert (method, path) == ("POST", "/api/logs/")
    assert {k: line[k] for k in ("name", "level", "message", "flow_run_id", "task_run_id")} == {
        "name": "fedrec.site.shop-a",
        "level": 30,
        "message": "shop-a answered train round 1",
        "flow_run_id": None,  # none known: null, not an empty id
        "task_run_id": "t-1",
    }


def test_a_404_is_told_apart_from_other_refusals(server, transport):
    """A 404 means the server was reached and the file is not there (a run's exchange files
    after it ended): a site then says so instead of reporting a connection problem."""
    from fedrec.sites.transport import NotFound

    ref = BlobRef.of("fedrec-sites/run/state.npz", DATA)
    server.answer("GET", BLOB, (404, b"no such file"))
    with pytest.raises(NotFound, match=r"^downloading fedrec-sites/run/state.npz: HTTP 404"):
        transport.get_blob(ref, 10**6)
    server.answer("GET", BLOB, (405, b"not allowed"))
    with pytest.raises(
        TransportError, match=r"^downloading fedrec-sites/run/state.npz: HTTP 405"
    ) as refused:
        transport.get_blob(ref, 10**6)
    assert not isinstance(refused.value, NotFound)
