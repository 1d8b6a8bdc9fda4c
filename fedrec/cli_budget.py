"""`fedrec budget`: what the users of a dataset have spent of their privacy budget, read from the
privacy ledger as a private run would read it, and whether a given private run would start."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from fedrec.cli_errors import UserError, debug_option, friendly_errors, store_error
from fedrec.config_flags import ConfigCommand

GROUPS_SHOWN = 5  # the tightest groups of users listed; --json lists them all


@click.command(cls=ConfigCommand)
@click.option(
    "--config",
    "config_file",
    type=str,
    default=None,
    help="the YAML file of the training run (its data, --dp-* and tracking keys are read)",
)
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout")
@debug_option
@friendly_errors
def budget(config_file: str | None, as_json: bool, **overrides: Any) -> None:
    """The privacy budget of a dataset's users, from the privacy ledger: the epsilon and delta
    they have spent across private runs, their cap, and what is left. With --dp-epsilon, whether
    that run would start; exit status 2 when the ledger would refuse it, with the line the run
    would end with. It takes `fedrec train`'s flags (the data, tracking and --dp-* ones matter),
    reads the data as that run would, and writes nothing to the ledger or the store.

    \b
    fedrec budget --data ml-1m
    fedrec budget --config nightly.yaml          would tonight's run start?
    fedrec budget --data ratings.csv --dp-epsilon 2 --json

    A run whose data and configuration are unchanged since the champion trains nothing and
    spends nothing, whatever the verdict (--skip-if-unchanged). Real sites (--sites) keep their
    users' budgets in each site's --state-dir; the coordinator holds none.
    """
    from fedrec.cli import check_inputs, config_values, training_config

    values, from_file = config_values(config_file, overrides)
    named = dict.fromkeys(from_file, config_file)
    for key, why in (
        ("resume", "a resumed run is not charged again; give the data of a new run"),
        ("sites", "each site keeps its own users' budget in its --state-dir (fedrec site run)"),
    ):
        if values.get(key) is not None:
            raise UserError(f"--{key}: {why}")
    check_inputs(values, named=named)
    config = training_config(values, named)
    report = _read(config)
    refused = None if report["run"] is None else report["run"]["refused"]
    if as_json:  # the refusal is in the object, and the exit status says it
        click.echo(json.dumps(report))
        if refused is not None:
            raise SystemExit(2)
        return
    _show(report)
    if refused is not None:
        raise UserError(refused)


def _read(config: Any) -> dict[str, Any]:
    """What the ledger holds for the users of ``config``'s data, as a JSON-ready dict."""
    from fedrec.cli import _status as status
    from fedrec.cli_models import _store_uri
    from fedrec.home import fedrec_home
    from fedrec.model_store import (
        TrackingStoreError,
        check_tracking_uri,
        resolve_tracking_uri,
        tracking_uri_source,
    )
    from models.privacy.dp import weak_guarantee
    from models.privacy.ledger import (
        BudgetError,
        DeltaAboveOneUser,
        standing,
        user_ids,
        user_keys,
    )
    from models.privacy.redaction import redact_uri

    with status("reading the data (loads pandas)"):
        from tasks.data import load_interactions
        from tasks.tracking import Standing, check_ledger_secret, ledger_request, ledger_standing

        data, _ = load_interactions.fn(config)
    ids = user_ids(data)
    uri = resolve_tracking_uri(config.tracking_uri, create=False)
    missing = uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()
    if missing and uri != f"sqlite:///{fedrec_home() / 'mlflow.db'}":  # a store that was named
        try:  # a folder that does not exist is refused, as the run refuses it
            check_tracking_uri(uri, name=tracking_uri_source(config.tracking_uri))
        except TrackingStoreError as err:
            raise store_error(err) from err
    request = None
    if config.dp_epsilon is not None:
        try:
            request = ledger_request(config, data.n_users)
            check_ledger_secret(uri, config.dp_ledger_secret)  # as the run checks it, store or not
        except (DeltaAboveOneUser, BudgetError) as err:
            raise UserError(str(err)) from err
    found = Standing(0, standing(user_keys(ids, os.urandom(32)), []), [])  # an empty ledger
    if not missing:  # a store that does not exist holds no entry: it is not created here
        with status("reading the privacy ledger (loads MLflow)"):
            try:
                found = ledger_standing(
                    _store_uri(uri),
                    ids,
                    model_name=config.registered_name,
                    secret_path=config.dp_ledger_secret,
                )
            except BudgetError as err:
                raise UserError(str(err).removesuffix(": not started")) from err
    groups = [_group(len(g.members), g.balance) for g in found.groups]
    refused, caps = None, []
    if request is not None:
        try:
            planned = found.plan(request, config.registered_name)
        except BudgetError as err:
            refused = str(err)
        else:  # the caps it would store for users who have none yet
            caps = [
                {"users": len(w.users), "epsilon": w.entry.cap.epsilon, "delta": w.entry.cap.delta}
                for w in planned
                if w.entry.cap is not None and w.users is not None
            ]
    return {
        "tracking_uri": redact_uri(uri),
        "store_exists": not missing,
        "ledger_entries": found.entries,
        "source": redact_uri(data.source),
        "model_name": config.registered_name,
        "users": len(ids),
        "groups": groups,
        "run": None
        if request is None
        else {
            "epsilon": request.epsilon,
            "delta": request.delta,
            "refused": refused,
            "stores_caps": caps,
            "warning": weak_guarantee(request.epsilon),
        },
    }


def _group(users: int, balance: Any) -> dict[str, Any]:
    """One group of users with one history: what they spent, their cap (None before their first
    private run) and what is left under it."""
    cap = balance.cap
    return {
        "users": users,
        "epsilon": balance.epsilon,
        "delta": balance.delta,
        "runs": balance.spends,
        "cap_epsilon": None if cap is None else cap.epsilon,
        "cap_delta": None if cap is None else cap.delta,
        "epsilon_left": None if cap is None else max(0.0, cap.epsilon - balance.epsilon),
        "delta_left": None if cap is None else max(0.0, cap.delta - balance.delta),
    }


def _show(report: dict[str, Any]) -> None:
    entries = report["ledger_entries"]
    if not report["store_exists"]:
        ledger = (
            "no MLflow store there yet, so no private run recorded (a run creates it; if the "
            "ledger is elsewhere, give its --tracking-uri)"
        )
    else:
        ledger = (
            f"{entries} entr{'y' if entries == 1 else 'ies'}" if entries else "no private run yet"
        )
    click.echo(f"privacy ledger of {report['tracking_uri']}: {ledger}")
    groups = report["groups"]
    click.echo(f"the {report['users']:,} users of {report['source']}:")
    for group in groups[:GROUPS_SHOWN]:
        click.echo(f"  {_describe(group)}")
    if len(groups) > GROUPS_SHOWN:
        click.echo(f"  ... {len(groups) - GROUPS_SHOWN} more groups with more left (--json)")
    run = report["run"]
    if run is None:
        click.echo("with --dp-epsilon E: whether that run would start")
        return
    asked = f"a private run of epsilon {run['epsilon']:.3g}, delta {run['delta']:.3g}"
    click.echo(f"{asked}: " + ("would start" if run["refused"] is None else "would be refused"))
    for cap in run["stores_caps"]:  # a cap of this run's own epsilon allows this run alone
        alone = (
            " (this run alone: --dp-budget E allows more)"
            if cap["epsilon"] <= run["epsilon"]
            else ""
        )
        click.echo(
            f"  and store the cap of {cap['users']:,} user{'s' * (cap['users'] != 1)} without "
            f"one: epsilon {cap['epsilon']:.3g}, delta {cap['delta']:.3g}{alone}"
        )
    if run["warning"] is not None:
        click.echo(f"warning: {run['warning']}")


def _describe(group: dict[str, Any]) -> str:
    who = f"{group['users']:,} user{'s' * (group['users'] != 1)}"
    if group["cap_epsilon"] is None:
        if group["runs"]:  # spent by entries that predate caps
            return f"{who}: spent epsilon {group['epsilon']:.3g}, no cap stored yet"
        return (
            f"{who}: no private run yet; the first stores their cap "
            "(--dp-budget, else that run's epsilon)"
        )
    runs = group["runs"]
    return (
        f"{who}: spent epsilon {group['epsilon']:.3g} of {group['cap_epsilon']:.3g} and delta "
        f"{group['delta']:.3g} of {group['cap_delta']:.3g} in {runs} private run"
        f"{'s' * (runs != 1)}; left: epsilon {group['epsilon_left']:.3g}, delta "
        f"{group['delta_left']:.3g}"
    )
