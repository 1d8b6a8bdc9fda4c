"""Client and server tasks of secure aggregation (protocol in :mod:`models.privacy.secagg_plus`).

One task per client per protocol phase (advertise keys, share keys, masked input, sign the
survivors, unmask) and one per server step. Each task is one call into the core; what crosses
between client and server is the protocol's messages as bytes (``to_bytes``/``from_bytes``, no
pickle), keyed by client.

What a client keeps between phases lives in its own storage, a folder beside its partition that
only its owner can read (``client-0003.secagg/``): its dense update from training until it is
masked, its protocol state (round keys, shares, seeds), and its long-term Ed25519 identity key.
Each phase reads the state, answers, and replaces the state atomically (temp file, fsync, rename),
so a phase may run in another process than the previous one (Dask workers) and an old copy of the
state never answers twice. The update is deleted once masked, and the client writes down (before
masking) a hash of the round and of the update: it masks neither twice, so no resumed or repeated
round can give the server two sums over one update (:func:`_mask_once`).

Identity keys (simulation): each client generates its key once per workspace, in its own folder,
and its public half is written to the registry folder (``secagg-registry/client-<id>.pub``) that
the coordinator and the clients verify signatures against. A registered key is never replaced.
In a real deployment this registration happens out of band (the site hands its public key to the
coordinator's operator, and clients obtain their peers' keys from a source they trust), never
through the server that relays the round keys.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.exceptions import MissingContextError

from models.data.partitions import ClientEntry
from models.federation.family import SecureFamily, min_secure_threshold
from models.files import (
    check_private_folders,
    folder_lock,
    make_private_folder,
    read_private,
    write_private,
)
from models.privacy.fixed_point import FRACTION_BITS
from models.privacy.identity import (
    KeyAuthenticationError,
    generate_identity,
    load_identity,
    load_registry,
    save_identity,
)
from models.privacy.secagg_plus import (
    EncryptedShares,
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    Message,
    ProtocolViolationError,
    RoundConfig,
    SecAggError,
    ShareInbox,
    SurvivorList,
    SurvivorSignature,
    TooFewClientsError,
    UnmaskRequest,
    UnmaskShares,
    default_threshold,
)
from models.privacy.secagg_plus_client import SecAggClient, mask_once
from models.privacy.secagg_plus_server import SecAggServer
from models.privacy.wire import pack, unpack
from models.protocol import ClientUpdate
from tasks.server import Progress, save_step, write_checkpoint

REGISTRY = "secagg-registry"
MASKED = "masked-updates"  # in a client's folder: one sha256 per round and per update masked
# why a resumed run's clients refuse the round it repeats (the CLI then offers no resume)
MASKED_ONCE = "cannot repeat a round its clients masked"
_RECEIPT = "held-update"
_ROUND = "round-config"
_EMPTY = np.zeros(0, np.int64)


# --- where a client keeps its secrets -------------------------------------------------------


def round_context(run_id: str, round_: int) -> bytes:
    """The round a held update belongs to."""
    return f"fedrec/{run_id}/round-{round_}".encode()


def client_folder(workspace: str, entry: ClientEntry) -> Path:
    """The client's own storage: a folder beside its partition."""
    return (Path(workspace) / entry.path).with_suffix(".secagg")


def pending_path(workspace: str, entry: ClientEntry) -> Path:
    """Where a client keeps its dense update from training until it masks it."""
    return client_folder(workspace, entry) / "held-update.npz"


def state_path(workspace: str, entry: ClientEntry) -> Path:
    """Where a client keeps its protocol state between phases."""
    return client_folder(workspace, entry) / "round-state.npz"


def registry_folder(workspace: str) -> Path:
    """The coordinator's registry of identity public keys (``client-<id>.pub``)."""
    return Path(workspace) / REGISTRY


def _read_private(path: Path, what: str) -> bytes:
    """The bytes of a file only its owner may read; a clear error if it is missing or shared."""
    try:
        return read_private(path, what)
    except FileNotFoundError as err:
        raise LookupError(f"{path.parent.name}: holds no {what}") from err


def hold_update(
    update: ClientUpdate, n_items: int, family: SecureFamily, context: bytes, where: Path
) -> bytes:
    """On the client: keep the update's dense vector at ``where`` for the round ``context``, with
    the fewest clients a sum of it may hold (:func:`min_secure_threshold`); returns a receipt
    that says only how long the vector is."""
    dense = np.asarray(family.to_dense(update, n_items), dtype=np.float64)
    fields = {"context": context, "min_threshold": min_secure_threshold(family)}
    payload = pack(fields, {"dense": dense})
    folder = Path(where).parent
    make_private_folder(folder)
    with folder_lock(folder):
        write_private(Path(where), payload)
    return held_receipt(int(dense.size))


def held_receipt(vector_size: int) -> bytes:
    """The receipt of a held update: only the length of its vector."""
    return pack({"kind": _RECEIPT, "vector_size": vector_size})


def _held(workspace: str, entry: ClientEntry, context: bytes) -> tuple[np.ndarray, int]:
    """The held update of round ``context`` and the fewest clients a sum of it may hold."""
    fields, arrays = unpack(_read_private(pending_path(workspace, entry), "held update"))
    if fields.get("context") != context:
        raise LookupError(
            f"client-{entry.client_id}: holds the update of {fields.get('context', b'').decode()}, "
            f"not of {context.decode()}"
        )
    return arrays["dense"], int(fields.get("min_threshold", 2))


def receipt_size(receipt: bytes) -> int:
    """The vector length a :func:`hold_update` receipt announces."""
    fields, _ = unpack(receipt)
    if fields.get("kind") != _RECEIPT or not isinstance(fields.get("vector_size"), int):
        raise ProtocolViolationError("not a held-update receipt")
    return fields["vector_size"]


def client_identity(workspace: str, entry: ClientEntry) -> Ed25519PrivateKey:
    """The client's long-term identity key, generated on first use in its own folder (0600) and
    its public half registered then; later calls (a resumed run) read the same key."""
    folder = client_folder(workspace, entry) / "identity"
    private_path = folder / f"client-{entry.client_id}.key"
    if not private_path.exists():
        make_private_folder(folder.parent)
        save_identity(generate_identity(), folder, entry.client_id)
    key = load_identity(private_path)
    _register(workspace, entry.client_id, folder / f"client-{entry.client_id}.pub")
    return key


def _register(workspace: str, client_id: int, public: Path) -> None:
    """Write the public half into the registry unless a key is registered for the client already
    (registration is once; a registered key is never replaced from here)."""
    target = registry_folder(workspace) / public.name
    if target.exists():
        return
    check_private_folders(target, "secure-aggregation key registry")
    make_private_folder(target.parent)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as out:
        out.write(public.read_bytes())


# --- the round's configuration ----------------------------------------------------------------


def round_threshold(n_clients: int, quorum: int) -> int:
    """t: a majority of the round's clients, at least 2, and at least the run's quorum."""
    return min(n_clients, max(default_threshold(n_clients), quorum))


def _round_message(config: RoundConfig) -> bytes:
    return pack({"kind": _ROUND} | config.to_json())


def read_round_config(message: bytes) -> RoundConfig:
    """The :class:`RoundConfig` of a round-configuration message."""
    fields, _ = unpack(message)
    if fields.pop("kind", None) != _ROUND:
        raise ProtocolViolationError("not a round configuration")
    return RoundConfig(**fields)


@dataclass(frozen=True)
class ServerStep:
    """What a server step hands back: its new state, the message for each client it goes on with,
    the clients it left out and why, and (after the commitment) what each survivor uploaded."""

    server: bytes
    to_clients: dict[int, bytes]
    left_out: dict[int, str] = field(default_factory=dict)
    received: list[ClientUpdate] = field(default_factory=list)


@task(name="secagg-open", cache_policy=NONE)
def secagg_open(
    *,
    run_id: str,
    round_: int,
    receipts: Mapping[int, bytes],
    asked: int,
    quorum: int,
    fraction_bits: int = FRACTION_BITS,
    binding: str = "",
) -> ServerStep:
    """Fix the round's configuration (clients, vector length, threshold t, fixed-point step,
    and the settings the updates were computed under) for the clients that hold an update;
    refuses a round that cannot reach t."""
    sizes = {receipt_size(r) for r in receipts.values()}
    if len(sizes) > 1:
        raise ProtocolViolationError(f"round {round_}: held updates of different lengths {sizes}")
    n_clients = max(asked, len(receipts))
    if n_clients < 2 or not sizes:
        raise TooFewClientsError(
            f"round {round_}: {len(receipts)} client(s) hold an update, secure aggregation needs "
            f"at least 2 (a sum of one client is its update): round refused"
        )
    threshold = round_threshold(n_clients, quorum)
    if len(receipts) < threshold:
        raise TooFewClientsError(
            f"round {round_}: {len(receipts)} of {n_clients} clients hold an update, threshold is "
            f"{threshold}: round refused"
        )
    config = RoundConfig(run_id, round_, n_clients, sizes.pop(), threshold, fraction_bits,
                         binding=binding)  # fmt: skip
    message = _round_message(config)
    state = SecAggServer(config).to_bytes()
    return ServerStep(state, dict.fromkeys(sorted(receipts), message))


# --- client phases ----------------------------------------------------------------------------


def _load(workspace: str, entry: ClientEntry, config: RoundConfig) -> SecAggClient:
    client = SecAggClient.from_bytes(_read_private(state_path(workspace, entry), "round state"))
    if (client.config.run_id, client.config.round) != (config.run_id, config.round):
        raise LookupError(
            f"client-{entry.client_id}: holds the state of round {client.config.round}, "
            f"not of round {config.round}"
        )
    return client


def _save(workspace: str, entry: ClientEntry, client: SecAggClient) -> None:
    write_private(state_path(workspace, entry), client.to_bytes())


def _aborted(entry: ClientEntry, round_: int, err: Exception) -> None:
    try:
        logger: Any = get_run_logger()
    except MissingContextError:  # called outside a run (tests of the task's function)
        logger = logging.getLogger(__name__)
    logger.error(
        "secure aggregation round %d: client-%d aborts its participation: %s",
        round_,
        entry.client_id,
        err,
    )


@contextlib.contextmanager
def _client_lock(workspace: str, entry: ClientEntry) -> Iterator[None]:
    """One phase of a client at a time: a late answer of an earlier round (one the flow stopped
    waiting for) finishes before the next round's phase reads or replaces the client's files."""
    folder = client_folder(workspace, entry)
    make_private_folder(folder)
    with folder_lock(folder):
        yield


def _client_step(
    workspace: str,
    entry: ClientEntry,
    config: bytes,
    act: Callable[[SecAggClient], Message],
    then: Callable[[], None] | None = None,
) -> bytes:
    """Load the client's state, ``act`` on it, save the new state (then run ``then``), holding
    the client's lock; a failed check is logged with the reason and aborts this client's round
    (its state is saved as aborted)."""
    round_config = read_round_config(config)
    with _client_lock(workspace, entry):
        client = _load(workspace, entry, round_config)
        try:
            reply = act(client)
        except (SecAggError, KeyAuthenticationError) as err:
            _save(workspace, entry, client)
            _aborted(entry, round_config.round, err)
            raise
        _save(workspace, entry, client)
        if then is not None:
            then()
    return reply.to_bytes()


@task(name="secagg-advertise", cache_policy=NONE)
def secagg_advertise(*, workspace: str, entry: ClientEntry, config: bytes) -> bytes:
    """On the client: a fresh protocol state for the round, and its round keys signed with its
    identity key (:class:`KeyAdvertisement`)."""
    round_config = read_round_config(config)
    context = round_context(round_config.run_id, round_config.round)
    held, _ = _held(workspace, entry, context)
    if held.size != round_config.vector_size:
        raise ProtocolViolationError(
            f"client-{entry.client_id}: holds {held.size} values, the round expects "
            f"{round_config.vector_size}"
        )
    client = SecAggClient(entry.client_id, round_config)
    with _client_lock(workspace, entry):
        advert = client.advertise_keys(client_identity(workspace, entry))
        _save(workspace, entry, client)
    return advert.to_bytes()


@task(name="secagg-share", cache_policy=NONE)
def secagg_share(*, workspace: str, entry: ClientEntry, config: bytes, message: bytes) -> bytes:
    """On the client: verify every peer's signed keys against the registry, then send encrypted
    shares of its self-mask seed and mask key (:class:`EncryptedShares`)."""
    registry = load_registry(registry_folder(workspace))
    directory = KeyDirectory.from_bytes(message)
    return _client_step(workspace, entry, config, lambda c: c.share_keys(directory, registry))


@task(name="secagg-mask", cache_policy=NONE)
def secagg_mask(
    *, workspace: str, entry: ClientEntry, config: bytes, message: bytes, vanish: bool = False
) -> bytes:
    """On the client: its masked update (:class:`MaskedInput`), all the server gets of it; the held
    update is deleted. ``vanish`` simulates a client that drops out after sharing its keys."""
    if vanish:
        raise ConnectionError(f"client-{entry.client_id} vanished after sharing its keys")
    round_config = read_round_config(config)
    context = round_context(round_config.run_id, round_config.round)
    inbox = ShareInbox.from_bytes(message)

    def mask(client: SecAggClient) -> Message:
        held, min_threshold = _held(workspace, entry, context)
        if round_config.threshold < min_threshold:  # a server that set t too low
            raise ProtocolViolationError(
                f"client-{entry.client_id}: the round's threshold {round_config.threshold} is "
                f"below the {min_threshold} clients whose noise shares make the full DP noise: "
                "refusing to mask"
            )
        _mask_once(workspace, entry, context, held)
        return client.masked_input(held, inbox)

    return _client_step(
        workspace,
        entry,
        config,
        mask,
        then=lambda: pending_path(workspace, entry).unlink(missing_ok=True),
    )


def _mask_once(workspace: str, entry: ClientEntry, context: bytes, held: np.ndarray) -> None:
    """:func:`~models.privacy.secagg_plus_client.mask_once` in the client's own folder: the
    record lives as long as the run's workspace, so it holds within a run and its resumes."""
    try:
        mask_once(client_folder(workspace, entry) / MASKED, context.decode(), held,
                  f"client-{entry.client_id}")  # fmt: skip
    except SecAggError as err:
        raise SecAggError(f"{err} (a resumed run {MASKED_ONCE}: start a new run)") from None


@task(name="secagg-sign", cache_policy=NONE)
def secagg_sign(*, workspace: str, entry: ClientEntry, config: bytes, message: bytes) -> bytes:
    """On the client: its identity signature over the committed survivor list."""
    survivors = SurvivorList.from_bytes(message)
    identity = client_identity(workspace, entry)
    return _client_step(workspace, entry, config, lambda c: c.sign_survivors(survivors, identity))


@task(name="secagg-unmask", cache_policy=NONE)
def secagg_unmask(*, workspace: str, entry: ClientEntry, config: bytes, message: bytes) -> bytes:
    """On the client: check the survivors' signatures, then reveal the shares that remove the
    survivors' self masks and the dropped clients' pairwise masks (:class:`UnmaskShares`)."""
    registry = load_registry(registry_folder(workspace))
    request = UnmaskRequest.from_bytes(message)
    return _client_step(workspace, entry, config, lambda c: c.unmask(request, registry))


# --- server steps -----------------------------------------------------------------------------


def _parse(
    kind: type[Message], answers: Mapping[int, bytes], sender_field: str
) -> tuple[list[Any], dict[int, str]]:
    """The messages that parse and name their sender, and why the others were left out."""
    kept, left_out = [], {}
    for client, data in sorted(answers.items()):
        try:
            message = kind.from_bytes(data)
        except (ProtocolViolationError, ValueError) as err:
            left_out[client] = f"malformed message: {err}"
            continue
        if getattr(message, sender_field) != client:
            left_out[client] = f"its message names client {getattr(message, sender_field)}"
            continue
        kept.append(message)
    return kept, left_out


def _server(state: bytes, workspace: str) -> SecAggServer:
    return SecAggServer.from_bytes(state, load_registry(registry_folder(workspace)))


@task(name="secagg-key-directory", cache_policy=NONE)
def secagg_key_directory(
    *, server: bytes, workspace: str, answers: Mapping[int, bytes]
) -> ServerStep:
    """The server: keep the advertisements whose signatures verify against the registry (U1) and
    broadcast them."""
    state = _server(server, workspace)
    adverts, left_out = _parse(KeyAdvertisement, answers, "client_id")
    directory = state.key_directory(adverts)
    left_out |= state.rejected
    message = directory.to_bytes()
    return ServerStep(
        state.to_bytes(), dict.fromkeys(sorted(directory.c_public), message), left_out
    )


@task(name="secagg-route-shares", cache_policy=NONE)
def secagg_route_shares(
    *, server: bytes, workspace: str, answers: Mapping[int, bytes]
) -> ServerStep:
    """The server: route each encrypted share to its recipient (the senders are U2)."""
    state = _server(server, workspace)
    shares, left_out = _parse(EncryptedShares, answers, "sender")
    inboxes = state.route_shares(shares)
    return ServerStep(state.to_bytes(), {u: m.to_bytes() for u, m in inboxes.items()}, left_out)


@task(name="secagg-commit", cache_policy=NONE)
def secagg_commit(*, server: bytes, workspace: str, answers: Mapping[int, bytes]) -> ServerStep:
    """The server: add the masked inputs and commit to their senders as the survivors (U3); no
    later input is accepted."""
    state = _server(server, workspace)
    inputs, left_out = _parse(MaskedInput, answers, "client_id")
    survivors = state.commit(inputs)
    received = [
        ClientUpdate(m.client_id, _EMPTY, _EMPTY, {"masked": m.vector})
        for m in inputs
        if m.client_id in survivors.survivors
    ]
    message = survivors.to_bytes()
    return ServerStep(
        state.to_bytes(), dict.fromkeys(survivors.survivors, message), left_out, received
    )


@task(name="secagg-unmask-request", cache_policy=NONE)
def secagg_unmask_request(
    *, server: bytes, workspace: str, answers: Mapping[int, bytes]
) -> ServerStep:
    """The server: ask the survivors that signed the survivor list for their shares, with at
    least t signatures attached."""
    state = _server(server, workspace)
    signatures, left_out = _parse(SurvivorSignature, answers, "client_id")
    request = state.unmask_request(signatures)
    left_out |= {u: why for u, why in state.rejected.items() if u in answers}
    message = request.to_bytes()
    return ServerStep(
        state.to_bytes(), dict.fromkeys(sorted(request.signatures), message), left_out
    )


@task(name="secagg-aggregate", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 5])
def secagg_aggregate(
    *,
    server: bytes,
    workspace: str,
    answers: Mapping[int, bytes],
    family: SecureFamily,
    state: Any,
    n_items: int,
    phase: str,
    record: Mapping[str, Any] | None = None,
    checkpoint_to: tuple[str, Progress] | None = None,
) -> tuple[Any, ClientUpdate, dict[str, float] | None]:
    """The server: remove the masks with the revealed shares, decode the survivors' sum and take
    the family's server step on it; then checkpoint the new state (``checkpoint_to`` =
    (folder, progress)) and record the previous step (``record``: the keyword arguments of
    :func:`~tasks.server.save_step` but the snapshot). The checkpoint comes first: the clients
    have masked their updates of this round once and will not again, so a resumed run must
    start after it. Returns the new state, the sum as one combined update, and the recorded
    metrics (None without ``record``). A retry decodes the same server state again."""
    server_state = _server(server, workspace)
    shares, _ = _parse(UnmaskShares, answers, "client_id")
    total = server_state.aggregate_decoded(shares)
    combined = family.from_dense_sum(total, n_items)
    new_state = family.server_update(state, [combined], phase)
    if checkpoint_to is not None:
        write_checkpoint(family, new_state, *checkpoint_to)
    metrics = None if record is None else save_step(**record, snapshot=None)
    return new_state, combined, metrics
