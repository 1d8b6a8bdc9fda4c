"""``fedrec keygen`` (an identity key pair) and ``fedrec site run`` (a site's process).

Both import only click and the standard library at module level; the site's libraries load
when ``site run`` starts.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import click

from fedrec.cli_errors import OneLineGroup, UserError, debug_option, friendly_errors
from fedrec.inputs import InputError, parse_rating_scale

_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")


@click.command()
@click.option("--name", required=True, help="site or 'coordinator': [a-z0-9-], up to 40")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="folder")
@debug_option
@friendly_errors
def keygen(name: str, out: str) -> None:
    """Write an Ed25519 identity: OUT/NAME.key (private, 0600, never overwritten) and
    OUT/NAME.pub (public: hand it to the other side out of band)."""
    if not _NAME.fullmatch(name):
        raise UserError(f"--name {name!r} must match [a-z0-9][a-z0-9-]{{0,39}}")
    from models.privacy.identity import generate_identity, write_identity
    from models.sites.messages import key_id

    folder = Path(out)
    if (folder / f"{name}.key").exists():
        raise UserError(f"{folder / f'{name}.key'} exists: an identity is generated once")
    key = generate_identity()
    private, public = write_identity(key, folder, name)
    click.echo(f"{private} (private, 0600)\n{public} (public, key id {key_id(key)})")


@click.group(cls=OneLineGroup)
def site() -> None:
    """A site of a real federation: its process runs next to its data."""


@site.command("run")
@click.option("--name", required=True, help="this site's name, as in the coordinator's sites.yaml")
@click.option(
    "--data", required=True, help="the site's ratings (CSV/Parquet, or a MovieLens folder)"
)
@click.option("--prefect-api", required=True, help="the coordinator's Prefect API URL")
@click.option(
    "--mlflow", required=True, help="the coordinator's MLflow server URL (artifact proxy)"
)
@click.option(
    "--identity",
    required=True,
    type=click.Path(dir_okay=False),
    help="this site's private key (fedrec keygen)",
)
@click.option(
    "--coordinator-key",
    required=True,
    help="the coordinator's public key: a PEM file or base64 raw key",
)
@click.option(
    "--state-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="where the site keeps its answers, its replay record and its users' privacy budget "
    "(what they have spent: keep it, or the budget starts again)",
)
@click.option(
    "--poll",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0.05),
    help="seconds between looks for requests (a fallback: new requests wake the site at once)",
)
@click.option(
    "--events/--no-events",
    default=True,
    show_default=True,
    help="listen on the Prefect API's events websocket for new requests",
)
@click.option(
    "--max-epsilon",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="the privacy budget of each user of this site, summed over every run: the site counts "
    "its own DP releases and refuses one that would pass it",
)
@click.option(
    "--max-delta",
    type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
    help="the same for delta, at most 1 / the site's users (default: 1e-06, for sites of up to "
    "a million users; each run is counted at a tenth). The coordinator learns it from the "
    "site's refusals: give a round number, never one computed from the count of users",
)
@click.option(
    "--peers",
    type=click.Path(dir_okay=False),
    help="a sites.yaml (without the coordinator's key) whose public keys this site pins for its "
    "peers in secure aggregation; without it the peers' keys come from the coordinator",
)
@click.option(
    "--allow-exact",
    is_flag=True,
    help="also answer runs without DP (fedrec train without --dp-epsilon): their per-item sums "
    "and evaluation sums leave this site exact, and no budget counts them; at enrolment the "
    "site then sends its exact user and row counts, and its item ids unless sites.yaml publishes "
    "a catalogue. Without it the site answers only private runs, sends no item id (it needs the "
    "published catalogue) and only a noisy user count, charged to its users' budget",
)
@click.option("--user-col", default="user_id", show_default=True, help="user column of --data")
@click.option("--item-col", default="item_id", show_default=True, help="item column of --data")
@click.option(
    "--rating-col",
    default="rating",
    show_default=True,
    help="rating column of --data; absent means implicit feedback",
)
@click.option(
    "--timestamp-col", default="timestamp", show_default=True, help="timestamp column (optional)"
)
@click.option(
    "--rating-scale",
    default="1,5",
    show_default=True,
    help="allowed ratings, LOW,HIGH (e.g. 0.5,5), or 'data' to take them from this site's data",
)
@debug_option
@friendly_errors
def run(
    name: str,
    data: str,
    prefect_api: str,
    mlflow: str,
    identity: str,
    coordinator_key: str,
    state_dir: str,
    poll: float,
    events: bool,
    max_epsilon: float,
    max_delta: float | None,
    peers: str | None,
    allow_exact: bool,
    user_col: str,
    item_col: str,
    rating_col: str,
    timestamp_col: str,
    rating_scale: str,
) -> None:
    """Answer the coordinator's requests for this site until stopped (SIGTERM/SIGINT).

    Connects out only: to the Prefect API (requests, answers, log lines) and to the MLflow
    artifact proxy (arrays). The rows never leave this process.
    """
    if not _NAME.fullmatch(name):
        raise UserError(f"--name {name!r} must match [a-z0-9][a-z0-9-]{{0,39}}")
    if not Path(identity).is_file():
        raise UserError(f"--identity {identity}: no such key file")
    try:
        scale = parse_rating_scale(rating_scale)
    except InputError as err:
        raise UserError(str(err)) from err
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    from fedrec.sites.process import SiteOptions, run_site

    options = SiteOptions(
        name=name,
        data=data,
        prefect_api=prefect_api,
        mlflow=mlflow,
        identity=Path(identity),
        coordinator_key=coordinator_key,
        state_dir=Path(state_dir),
        poll_seconds=poll,
        events=events,
        max_epsilon=max_epsilon,
        max_delta=max_delta,
        peers=peers,
        allow_exact=allow_exact,
        read_options={
            "user_col": user_col,
            "item_col": item_col,
            "rating_col": rating_col,
            "timestamp_col": timestamp_col,
            "rating_scale": scale,
        },
    )
    run_site(options)


@site.command("prune")
@click.option(
    "--state-dir",
    required=True,
    type=click.Path(file_okay=False, exists=True),
    help="the site's state folder (fedrec site run --state-dir)",
)
@click.option(
    "--older-than",
    default=7.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="days: answers kept longer than this are removed (a run's requests expire within "
    "minutes, so a week leaves every run that can still ask alone)",
)
@click.option("--dry-run", is_flag=True, help="say what would be removed, remove nothing")
@debug_option
@friendly_errors
def prune(state_dir: str, older_than: float, dry_run: bool) -> None:
    """Remove the answers this site keeps (STATE_DIR/record/answers) once they are old.

    A site keeps every answer it sent so that a retried request gets the same bytes and is not
    charged again. A pruned answer's line stays in the record: the site refuses that exchange
    if it is asked again, and never answers it a second time. The budget ledger and the
    answered requests' nonces are kept. Safe while the site runs.
    """
    from models.sites.answers import RECORD, prune_answers

    folder = Path(state_dir) / "record"
    if not (folder / RECORD).exists():
        raise UserError(f"{folder / RECORD}: no record of answers (is {state_dir} a site's "
                        "--state-dir?)")  # fmt: skip
    try:
        report = prune_answers(folder, older_than * 86400, dry_run=dry_run)
    except ValueError as err:
        raise UserError(str(err)) from err
    runs = f"{len(report.runs)} run{'s' * (len(report.runs) != 1)}"
    click.echo(
        f"{'would remove' if dry_run else 'removed'} {report.answers} kept answer"
        f"{'s' * (report.answers != 1)} of {runs} ({report.nbytes / 1e6:.1f} MB), older than "
        f"{older_than:g} days, from {folder}"
        + ("" if dry_run or not report.answers else "; asked again, they are refused")
    )
