"""Secure aggregation in the round loop: the protocol half of a round whose training tasks kept
their updates on the clients (:mod:`models.privacy.secagg_plus`, tasks in :mod:`tasks.secure`).

A round goes: the server fixes the round (threshold t) -> clients advertise signed keys -> the
server keeps the verified ones -> clients share their seeds -> the server routes the shares ->
clients send masked inputs -> the server commits to the survivors -> survivors sign that list ->
the server asks for shares -> survivors unmask -> the server removes the masks and steps.

Over real sites (``ctx.sites``) each client phase is a proxy task of the site
(:meth:`tasks.remote.SiteLink.secagg`, site side :mod:`fedrec.sites.secure`), the round is bound
to the coordinator's flow run (what the sites' requests name) and uses a finer fixed-point step;
the server steps are the same, verifying against the sites' ``sites.yaml`` keys.

A client that fails, times out or is refused at any phase is left out, and the protocol removes
its masks through the others' shares; no update is ever masked twice. Fewer than t clients at
any step refuse the round (:class:`QuorumError`).

Every sampled round runs the protocol, and so does a phase every client answers once when the
family encodes its answer densely (``secure_everyone_phases``, e.g. the explicit family's global
mean: each client's rating sum and count), as round ``EVERYONE_ROUND``. Other such phases (item
co-occurrences) reach the server in the clear, and the run says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from prefect import Task, get_run_logger

from fedrec.sites.secure import FRACTION_BITS as SITES_FRACTION_BITS
from flows.rounds import QuorumError, RunContext, answered, note_missed, quorum
from models.federation.family import Family, Phase, secure_phase
from models.federation.loop import EVERYONE_ROUND
from models.privacy.secagg_plus import TooFewClientsError
from models.sites.spec import family_spec, training_binding
from tasks.secure import (
    ServerStep,
    read_round_config,
    round_context,
    secagg_advertise,
    secagg_aggregate,
    secagg_commit,
    secagg_key_directory,
    secagg_mask,
    secagg_open,
    secagg_route_shares,
    secagg_share,
    secagg_sign,
    secagg_unmask,
    secagg_unmask_request,
)
from tasks.server import Progress


def everyone_context(ctx: RunContext, family: Family, phase: Phase) -> bytes | None:
    """The secure-aggregation round of a phase every client answers once, or None when it runs
    in the clear (secure aggregation off, or a phase the family cannot encode)."""
    if not ctx.config.secure_aggregation or not secure_phase(family, phase):
        return None
    return round_context(ctx.run_id, EVERYONE_ROUND)


def _label(r: int, phase: str) -> str:
    return f"the {phase} round" if r == EVERYONE_ROUND else f"round {r}"


def secure_round(
    ctx: RunContext,
    family: Family,
    state: Any,
    held: Mapping[int, bytes],
    r: int,
    phase: str,
    asked: int,
    *,
    record: dict[str, Any] | None = None,
    checkpoint_to: tuple[str, Progress] | None = None,
) -> tuple[Any, list, dict[str, float] | None]:
    """The protocol half of securely aggregated round ``r`` (``EVERYONE_ROUND`` for a phase
    every client answers once): ``held`` maps each client that trained to its held-update
    receipt, ``asked`` is how many were asked. The task that decodes the sum also records the
    previous step (``record``, as :func:`~tasks.server.save_step`) and checkpoints the new
    state (``checkpoint_to`` = (folder, progress)), so a decoded round is on disk before
    anything else can fail: clients mask an update once, and a resumed run that repeated the
    round would find them refusing. Returns the new state, the masked inputs the server
    committed to (what it received) and the recorded metrics (None without ``record``)."""
    if r == 1:
        _warn_clear_phases(family, ctx.config.rounds)
    try:
        return _protocol(ctx, family, state, held, r, phase, asked, record, checkpoint_to)
    except TooFewClientsError as err:
        raise QuorumError(f"{_label(r, phase)} (secure aggregation): {err}") from err


def _protocol(
    ctx: RunContext,
    family: Family,
    state: Any,
    held: Mapping[int, bytes],
    r: int,
    phase: str,
    asked: int,
    record: dict[str, Any] | None,
    checkpoint_to: tuple[str, Progress] | None,
) -> tuple[Any, list, dict[str, float] | None]:
    workspace = ctx.workspace
    if ctx.sites is None:
        run_id, bits = ctx.run_id, {}
    else:  # real sites bind a round to the run they were asked in and to the settings they
        # trained under (each checks it against its own), and sum to 2^-36
        run_id = ctx.sites.run
        bits = {"fraction_bits": SITES_FRACTION_BITS,
                "binding": training_binding(family_spec(family), phase)}  # fmt: skip
    step = secagg_open(
        run_id=run_id,
        round_=r,
        receipts=held,
        asked=asked,
        quorum=quorum(ctx.config, asked),
        **bits,
    )
    config = next(iter(step.to_clients.values()))
    clients = _Clients(ctx, r, config)
    server = partial(_server, r=r, workspace=workspace, names=ctx.client_names, missed=ctx.missed)
    adverts = clients.run(secagg_advertise, "advertise", step.to_clients, with_message=False)
    step = server(secagg_key_directory, step, adverts)
    shares = clients.run(secagg_share, "share", step.to_clients)
    step = server(secagg_route_shares, step, shares)
    vanishing = set(ctx.config.fault_dropout_clients)
    masked = clients.run(secagg_mask, "mask", step.to_clients, vanish=lambda c: c in vanishing)
    step = server(secagg_commit, step, masked)
    received = step.received
    signatures = clients.run(secagg_sign, "sign", step.to_clients)
    step = server(secagg_unmask_request, step, signatures)
    answers = clients.run(secagg_unmask, "unmask", step.to_clients)
    state, _, metrics = secagg_aggregate(
        server=step.server,
        workspace=workspace,
        answers=answers,
        family=family,
        state=state,
        n_items=ctx.n_items,
        phase=phase,
        record=ctx.unwalked(record),
        checkpoint_to=checkpoint_to,
    )
    get_run_logger().info(
        "%s: securely aggregated the updates of %d of %d clients (threshold %d)",
        _label(r, phase),
        len(received),
        len(held),
        read_round_config(config).threshold,
    )
    return state, received, metrics


class _Clients:
    """Submits one protocol phase to each client that gets a message, and collects the answers
    that arrive in time (failures and stragglers are logged and left out)."""

    def __init__(self, ctx: RunContext, r: int, config: bytes) -> None:
        self.ctx, self.r, self.config = ctx, r, config

    def run(
        self,
        task: Task,
        stage: str,
        messages: Mapping[int, bytes],
        with_message: bool = True,
        vanish: Callable[[int], bool] | None = None,
    ) -> dict[int, bytes]:
        futures = {}
        for c, message in sorted(messages.items()):
            name = f"secagg-{stage} client-{c} round-{self.r}"
            if self.ctx.sites is not None:  # a real site answers; a proxy task waits for it
                entry = next(e for e in self.ctx.entries if e.client_id == c)
                sent = message if with_message else None
                futures[c] = self.ctx.sites.secagg(
                    entry, name, step=stage, config=self.config, message=sent
                )
                continue
            extra: dict[str, Any] = {"message": message} if with_message else {}
            if vanish is not None:
                extra["vanish"] = vanish(c)
            named = task.with_options(task_run_name=name)
            futures[c] = named.submit(
                workspace=self.ctx.workspace, entry=self.ctx.entries[c], config=self.config, **extra
            )
        what = f"round {self.r} secagg-{stage}"
        return answered(futures, what, self.ctx.config.round_timeout,
                        names=self.ctx.client_names, missed=self.ctx.missed)  # fmt: skip


def _server(
    task: Task,
    step: ServerStep,
    answers: dict[int, bytes],
    *,
    r: int,
    workspace: str,
    names: Mapping[int, str] | None = None,
    missed: dict[str, list[str]] | None = None,
) -> ServerStep:
    """One server step over the clients' answers; logs every client it left out and why, and
    adds each named one to ``missed`` (:func:`~flows.rounds.note_missed`)."""
    following = task(server=step.server, workspace=workspace, answers=answers)
    for client, why in sorted(following.left_out.items()):
        # a warning, as for any client a round goes on without (the round itself succeeds)
        get_run_logger().warning(
            "round %d: %s left client-%d out of secure aggregation: %s", r, task.name, client, why
        )
    note_missed(missed, names, f"round {r} {task.name}", following.left_out)
    return following


def _warn_clear_phases(family: Family, rounds: int) -> None:
    """Secure aggregation covers the phases :func:`~models.federation.family.secure_phase`
    names; any other phase every client answers once (item co-occurrences) reaches the server in
    the clear: say so."""
    clear = [p.name for p in family.phases(rounds) if not secure_phase(family, p)]
    if clear:
        get_run_logger().warning(
            "secure aggregation does not cover all of the %s family's phases: phase(s) %s send "
            "each client's answer to the server in the clear",
            family.name,
            ", ".join(clear),
        )
