"""The secure-aggregation tasks' own checks, called as functions: what the server may open a
round with, what it records of a client's upload, whom it names as left out, and the folder a
client keeps its secrets in."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from tests.flows.helpers import secagg_entry, secagg_update

N_ITEMS, RUN, ROUND = 5, "run-s", 1


def _family():
    from models.mf.family import ExplicitMF
    from models.mf.federated import MFConfig

    return ExplicitMF(MFConfig(n_factors=2))


def _open(workspace: Path, clients: list[int]):
    """Each client holds its update for the round; the server opens it. Returns the entries, the
    round's configuration message and the server's step."""
    from tasks import secure

    (workspace / "clients").mkdir(exist_ok=True)
    entries = {c: secagg_entry(c) for c in clients}
    context = secure.round_context(RUN, ROUND)
    receipts = {
        c: secure.hold_update(
            secagg_update(c), N_ITEMS, _family(), context, secure.pending_path(str(workspace), e)
        )
        for c, e in entries.items()
    }
    step = secure.secagg_open.fn(
        run_id=RUN, round_=ROUND, receipts=receipts, asked=len(clients), quorum=2
    )
    return entries, step.to_clients[clients[0]], step


def _through_commit(workspace: Path, clients: list[int]):
    """The protocol up to the server's commitment to the survivors (all of ``clients``)."""
    from tasks import secure

    ws = str(workspace)
    entries, config, step = _open(workspace, clients)
    answers = {
        c: secure.secagg_advertise.fn(workspace=ws, entry=e, config=config)
        for c, e in entries.items()
    }
    step = secure.secagg_key_directory.fn(server=step.server, workspace=ws, answers=answers)
    for client_task, server_task in (
        (secure.secagg_share, secure.secagg_route_shares),
        (secure.secagg_mask, secure.secagg_commit),
    ):
        answers = {
            c: client_task.fn(workspace=ws, entry=entries[c], config=config, message=m)
            for c, m in step.to_clients.items()
        }
        step = server_task.fn(server=step.server, workspace=ws, answers=answers)
    return entries, config, step, answers


def test_a_receipt_says_a_length_and_nothing_else_passes_for_one():
    from models.privacy.secagg_plus import ProtocolViolationError
    from models.privacy.wire import pack
    from tasks import secure

    assert secure.receipt_size(secure.held_receipt(7)) == 7
    with pytest.raises(ProtocolViolationError, match="not a held-update receipt"):
        secure.receipt_size(pack({"kind": "round-config", "vector_size": 7}))
    with pytest.raises(ProtocolViolationError, match="not a held-update receipt"):
        secure.receipt_size(pack({"kind": "held-update", "vector_size": "7"}))


@pytest.mark.parametrize(
    ("held", "asked", "quorum", "why"),
    [
        ([5], 1, 1, "secure aggregation needs at least 2"),  # a sum of one is its update
        ([], 3, 2, "secure aggregation needs at least 2"),
        ([5], 3, 1, "1 of 3 clients hold an update, threshold is 2"),
        ([5, 5], 3, 3, "2 of 3 clients hold an update, threshold is 3"),
    ],
)
def test_the_server_opens_no_round_whose_sum_could_be_one_clients_update(held, asked, quorum, why):
    from models.privacy.secagg_plus import TooFewClientsError
    from tasks import secure

    receipts = {c: secure.held_receipt(size) for c, size in enumerate(held)}
    with pytest.raises(TooFewClientsError, match=why):
        secure.secagg_open.fn(
            run_id=RUN, round_=ROUND, receipts=receipts, asked=asked, quorum=quorum
        )


def test_the_server_opens_a_round_of_two_and_of_every_client_asked():
    from tasks import secure

    def opened(asked: int, quorum: int):
        step = secure.secagg_open.fn(
            run_id=RUN,
            round_=ROUND,
            receipts={4: secure.held_receipt(6), 9: secure.held_receipt(6)},
            asked=asked,
            quorum=quorum,
        )
        assert sorted(step.to_clients) == [4, 9]
        return secure.read_round_config(step.to_clients[9])

    config = opened(asked=2, quorum=2)
    assert (config.n_clients, config.vector_size, config.threshold) == (2, 6, 2)
    # three asked, two hold an update: the round is over the three asked, t a majority of them
    config = opened(asked=3, quorum=1)
    assert (config.n_clients, config.threshold) == (3, 2)


def test_held_updates_of_two_lengths_open_no_round():
    from models.privacy.secagg_plus import ProtocolViolationError
    from tasks import secure

    receipts = {0: secure.held_receipt(5), 1: secure.held_receipt(6), 2: secure.held_receipt(5)}
    with pytest.raises(ProtocolViolationError, match="held updates of different lengths"):
        secure.secagg_open.fn(run_id=RUN, round_=ROUND, receipts=receipts, asked=3, quorum=2)


def test_what_the_server_records_of_an_upload_is_the_masked_vector_alone(tmp_path):
    from models.privacy.secagg_plus import MaskedInput

    _, _, step, masked = _through_commit(tmp_path, [0, 1, 2])

    assert [u.client_id for u in step.received] == [0, 1, 2]
    for update in step.received:
        sent = MaskedInput.from_bytes(masked[update.client_id]).vector
        assert update.items.size == 0 and update.counts.size == 0  # no item of the client
        assert list(update.arrays) == ["masked"]
        np.testing.assert_array_equal(update.arrays["masked"], sent)
        assert update.nbytes() == sent.nbytes  # the bytes a round reports as uploaded


def test_a_survivor_whose_signature_does_not_verify_is_left_out_by_name(tmp_path):
    """Client 2 answers the survivor list with a signature of client 1's identity key: the
    server drops it, names it and why, goes on with the t that verify, and names no client
    that was not asked."""
    from models.privacy.secagg_plus import SurvivorSignature
    from tasks import secure

    ws = str(tmp_path)
    entries, config, step, _ = _through_commit(tmp_path, [0, 1, 2])
    signed = {
        c: secure.secagg_sign.fn(workspace=ws, entry=entries[c], config=config, message=m)
        for c, m in step.to_clients.items()
    }
    forged = SurvivorSignature.from_bytes(signed[1])
    signed[2] = SurvivorSignature(2, forged.signature).to_bytes()

    request = secure.secagg_unmask_request.fn(server=step.server, workspace=ws, answers=signed)

    assert sorted(request.to_clients) == [0, 1]
    assert list(request.left_out) == [2]
    assert "signature" in request.left_out[2] and "survivor list" in request.left_out[2]


def test_a_client_folder_a_refused_phase_creates_is_its_owners_alone(tmp_path):
    """A phase asked of a client that holds no round state creates the client's folder (for its
    lock) before it refuses: the folder is the owner's only."""
    from tasks import secure

    ws = str(tmp_path)
    entries, config, step = _open(tmp_path, [0, 1])
    answers = {
        c: secure.secagg_advertise.fn(workspace=ws, entry=e, config=config)
        for c, e in entries.items()
    }
    step = secure.secagg_key_directory.fn(server=step.server, workspace=ws, answers=answers)
    stranger = secagg_entry(7)  # never held an update, never advertised
    folder = secure.client_folder(ws, stranger)
    assert not folder.exists()
    with pytest.raises(LookupError, match="holds no round state"):
        secure.secagg_share.fn(
            workspace=ws, entry=stranger, config=config, message=step.to_clients[0]
        )
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_client_identity_made_first_lives_in_a_folder_of_its_owners_alone(tmp_path):
    from tasks import secure

    entry = secagg_entry(8)
    key = secure.client_identity(str(tmp_path), entry)

    folder = secure.client_folder(str(tmp_path), entry)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    private = folder / "identity" / "client-8.key"
    assert stat.S_IMODE(private.stat().st_mode) & 0o077 == 0  # the owner's only
    # the public half is in the coordinator's registry, and a second call reads the same key
    assert (secure.registry_folder(str(tmp_path)) / "client-8.pub").is_file()
    again = secure.client_identity(str(tmp_path), entry)
    assert again.private_bytes_raw() == key.private_bytes_raw()
    assert stat.S_IMODE(secure.registry_folder(str(tmp_path)).stat().st_mode) == 0o700


def test_a_client_registers_no_key_in_a_registry_folder_others_may_write(tmp_path):
    """The server steps would refuse such a registry when they read it; the key is not written
    there in the first place, and the refusal names the folder."""
    from models.files import UnsafeFile
    from tasks import secure

    shared = secure.registry_folder(str(tmp_path))
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafeFile, match=rf"reached through {shared}, which every user may write"):
        secure.client_identity(str(tmp_path), secagg_entry(8))
    assert list(shared.iterdir()) == []


def test_a_named_site_a_server_step_leaves_out_is_recorded_as_missing_that_step(
    tmp_path, prefect_server
):
    """A server step that refuses a site's message leaves the site out of the round: the run's
    record of what each site missed names the step and why, as for a site that did not answer;
    a client without a name is not recorded."""
    from prefect import flow

    from flows.secure import _server
    from models.privacy.secagg_plus import SurvivorSignature
    from tasks import secure

    ws = str(tmp_path)
    entries, config, step, _ = _through_commit(tmp_path, [0, 1, 2])
    signed = {
        c: secure.secagg_sign.fn(workspace=ws, entry=entries[c], config=config, message=m)
        for c, m in step.to_clients.items()
    }
    signed[2] = SurvivorSignature(2, SurvivorSignature.from_bytes(signed[1]).signature).to_bytes()

    @flow
    def unmask_request(names):
        missed: dict[str, list[str]] = {}
        kept = _server(secure.secagg_unmask_request, step, signed, r=ROUND, workspace=ws,
                       names=names, missed=missed)  # fmt: skip
        return sorted(kept.to_clients), missed

    survivors, missed = unmask_request({0: "shop-a", 1: "shop-b", 2: "shop-c"})
    assert survivors == [0, 1]
    assert list(missed) == ["shop-c"]
    (step_missed,) = missed["shop-c"]
    assert step_missed.startswith(f"round {ROUND} secagg-unmask-request (")
    assert "signature" in step_missed and "survivor list" in step_missed
    assert unmask_request({0: "shop-a", 1: "shop-b"}) == ([0, 1], {})
