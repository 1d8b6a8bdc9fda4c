"""Secure aggregation in the round loop: the masking half of a round whose training tasks
returned public keys instead of updates."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger

from flows.rounds import QuorumError, RunContext, answered, require_quorum
from models.federation.family import Family
from tasks.secure import mask_client, rekey_client, round_context, secure_aggregate


def secure_round(
    ctx: RunContext, family: Family, state: Any, public: dict[int, bytes], r: int, phase: str
) -> tuple[Any, list]:
    """The masking half of a securely aggregated round. If a client vanishes after the key
    agreement, the round runs again among the survivors with fresh keys (up to round_retries
    times), since its masks would not cancel; then the server adds the masked vectors. Returns
    the new state and the masked updates (what the server received)."""
    config, context = ctx.config, round_context(ctx.run_id, r)
    for attempt in range(config.round_retries + 1):
        futures = {
            c: mask_client.with_options(task_run_name=f"mask client-{c} round-{r}").submit(
                ctx.workspace, ctx.entries[c], public, context, c in config.fault_dropout_clients
            )
            for c in public
        }
        masked = answered(futures, f"round {r} masking", config.round_timeout)
        if len(masked) == len(public):
            vectors = list(masked.values())
            state, _ = secure_aggregate(
                family=family, state=state, masked=vectors, n_items=ctx.n_items, phase=phase
            )
            return state, vectors
        survivors = sorted(masked)
        require_quorum(len(survivors), len(public), config, f"round {r} (secure aggregation)")
        if attempt == config.round_retries:
            break
        fresh = round_context(ctx.run_id, r, attempt + 1)
        get_run_logger().warning(
            "round %d: %d client(s) vanished after the key agreement; "
            "agreeing keys again among %d survivors",
            r,
            len(public) - len(survivors),
            len(survivors),
        )
        rekeyed = {
            c: rekey_client.submit(ctx.workspace, ctx.entries[c], context, fresh) for c in survivors
        }
        public = answered(rekeyed, f"round {r} re-keying")
        context = fresh
    raise QuorumError(f"round {r}: clients kept vanishing during secure aggregation")
