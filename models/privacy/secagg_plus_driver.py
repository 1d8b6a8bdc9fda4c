"""One round of secure aggregation with every client and the server in one process, for tests and
benchmarks.

Every message goes through its byte encoding, as it would over a network, and is counted; with
``state_through_bytes`` each client's state is also written and read back between phases, as when
a client's phases run in different processes. ``drop`` makes clients vanish at a stage: a client
dropped at ``"mask"`` advertised keys and shared them but sends no masked input.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from models.privacy.fixed_point import decode
from models.privacy.secagg_plus import (
    Message,
    RoundConfig,
)
from models.privacy.secagg_plus_client import SecAggClient
from models.privacy.secagg_plus_server import SecAggServer

STAGES = ("advertise", "share", "mask", "sign", "unmask")


@dataclass
class RoundCost:
    """Seconds spent and bytes sent/received, per client and by the server."""

    client_seconds: dict[int, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)


@dataclass
class RoundResult:
    """The decoded sum, its uint64 form, who it covers, and what it cost."""

    total: np.ndarray
    encoded_total: np.ndarray
    survivors: tuple[int, ...]
    cost: RoundCost


def run_round(
    updates: Mapping[int, np.ndarray],
    config: RoundConfig,
    identities: Mapping[int, Ed25519PrivateKey],
    registry: Mapping[int, Ed25519PublicKey],
    drop: Mapping[str, Collection[int]] | None = None,
    state_through_bytes: bool = False,
) -> RoundResult:
    """Run AdvertiseKeys, ShareKeys, MaskedInput, ConsistencyCheck and Unmasking.

    Parameters
    ----------
    updates : mapping of int to ndarray
        Each client's update (``config.vector_size`` values).
    config : RoundConfig
    identities : mapping of int to Ed25519PrivateKey
        Each client's long-term identity key.
    registry : mapping of int to Ed25519PublicKey
        The identity public keys every party trusts.
    drop : mapping of stage to client ids, optional
        Clients that vanish at a stage (one of :data:`STAGES`) and stay away.
    state_through_bytes : bool
        Write and re-read every client's state between phases.

    Returns
    -------
    RoundResult

    Raises
    ------
    TooFewClientsError, KeyAuthenticationError, ProtocolViolationError
        As the parties raise them.
    """
    drop = {stage: set(ids) for stage, ids in (drop or {}).items()}
    unknown = sorted(set(drop) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown dropout stage(s) {unknown}, expected some of {list(STAGES)}")
    net = _Network(config, list(updates), drop, state_through_bytes)
    server = SecAggServer(config, registry)

    adverts = net.clients(
        "advertise", updates, None, lambda c, u, _: c.advertise_keys(identities[u])
    )
    directory = net.server(server.key_directory, adverts)
    shares = net.clients(
        "share", directory.c_public, lambda u: directory, lambda c, u, m: c.share_keys(m, registry)
    )
    inboxes = net.server(server.route_shares, shares)
    masked = net.clients(
        "mask", inboxes, inboxes.get, lambda c, u, m: c.masked_input(updates[u], m)
    )
    survivors = net.server(server.commit, masked)
    signatures = net.clients(
        "sign",
        survivors.survivors,
        lambda u: survivors,
        lambda c, u, m: c.sign_survivors(m, identities[u]),
    )
    request = net.server(server.unmask_request, signatures)
    answers = net.clients(
        "unmask", request.signatures, lambda u: request, lambda c, u, m: c.unmask(m, registry)
    )
    encoded = net.server(server.aggregate, answers)
    total = decode(encoded, fraction_bits=config.fraction_bits)
    return RoundResult(total, encoded, survivors.survivors, net.cost)


class _Network:
    """Carries messages as bytes between the server and the clients, and keeps the clients'
    states, the dropouts and the costs."""

    def __init__(
        self,
        config: RoundConfig,
        clients: list[int],
        drop: dict[str, set[int]],
        state_through_bytes: bool,
    ) -> None:
        self.drop = drop
        self.gone: set[int] = set()
        self.through_bytes = state_through_bytes
        self.cost = RoundCost(
            dict.fromkeys(clients, 0.0), 0.0, dict.fromkeys(clients, 0), dict.fromkeys(clients, 0)
        )
        self.states: dict[int, bytes | SecAggClient] = {}
        for u in clients:
            client = SecAggClient(u, config)
            self.states[u] = client.to_bytes() if state_through_bytes else client

    def clients(
        self,
        stage: str,
        recipients: Collection[int],
        inbound: Callable[[int], Message] | None,
        act: Callable[[SecAggClient, int, Message | None], Message],
    ) -> list[Message]:
        """Each recipient still there gets its message, acts on it, and answers."""
        self.gone |= self.drop.get(stage, set())
        replies = []
        for u in sorted(recipients):
            if u in self.gone:
                continue
            message = None if inbound is None else self._carry(inbound(u), self.cost.bytes_down, u)
            started = time.perf_counter()
            state = self.states[u]
            client = SecAggClient.from_bytes(state) if self.through_bytes else state
            reply = act(client, u, message)
            self.states[u] = client.to_bytes() if self.through_bytes else client
            self.cost.client_seconds[u] += time.perf_counter() - started
            replies.append(self._carry(reply, self.cost.bytes_up, u))
        return replies

    def server(self, step: Callable[[list[Message]], Any], messages: list[Message]) -> Any:
        started = time.perf_counter()
        out = step(messages)
        self.cost.server_seconds += time.perf_counter() - started
        return out

    @staticmethod
    def _carry(message: Message, counter: dict[int, int], client: int) -> Message:
        data = message.to_bytes()
        counter[client] += len(data)
        return type(message).from_bytes(data)
