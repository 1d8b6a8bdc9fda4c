"""A run over real sites, set up from ``sites.yaml``: enrolment, the catalogue, the MLflow run.

Each site listed in ``sites.yaml`` is asked (one proxy task run per site, ``enroll <site>``)
to enrol in a run that is private or not. When ``sites.yaml`` publishes a catalogue, the sites
are numbered against it and send no item id; otherwise the catalogue is the union of the item
sets the sites send, which only sites that answer runs without DP do. Either way the
coordinator never learns which user touched which item. What it learns of a site that answers
runs without DP: its number of users and of train / validation / test rows (logged like the
simulation's partition profile), and its item ids without a published catalogue; of a site
that answers only private runs: its number of users with noise it charges to its users'
budget, and for a run without ``--dp-epsilon`` only that it will not answer it (such a run is
refused here, before anything is written). Every site also sends a fingerprint of its rows
keyed with its own secret. The enrolment of a rating model's run names its rating scale: a
site whose data has no ratings, or ratings on another scale, refuses to enrol. Sites that do not enrol within their deadline are left out of the
run, under the same quorum as any round. No row is read, written or received here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import get_run_logger
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from fedrec.config import TrainingConfig, fedrec_home
from fedrec.sites.transport import Transport, TransportError
from flows.rounds import RunContext, answered, require_quorum
from models.data.partitions import ClientEntry, Manifest, remove_workspace
from models.sites.catalogue import left_out_note, union_catalogue
from models.sites.messages import FROM_DATA
from models.sites.registry import Registry, read_registry
from tasks.remote import SiteLink, enroll_site, record_enrolment, register_site_keys
from tasks.tracking import (
    load_champion,
    resolve_tracking_uri,
    start_run,
    tag_run,
    untag_run,
)


class SitesRefuseExact(ValueError):
    """A run without DP asked of sites that answer only private runs."""

    one_line = True


def _servers(config: TrainingConfig) -> tuple[str, str]:
    """The Prefect API and the MLflow server the sites reach: the run's own."""
    from prefect.settings import get_current_settings

    api = get_current_settings().api.url
    uri = resolve_tracking_uri(config.tracking_uri)
    if not api or not uri.startswith(("http://", "https://")):
        raise ValueError(
            "--sites needs a Prefect server (PREFECT_API_URL) and an MLflow tracking server "
            f"with the artifact proxy (--tracking-uri http://...); got {api!r} and {uri!r}"
        )
    return str(api), uri


def _scale(config: TrainingConfig) -> tuple[float, float] | str | None:
    """The rating scale a run's enrolment names: its own for a rating model (explicit
    feedback), ``"data"`` when it takes the scale from the data; None for a run without
    ratings. A site whose data cannot serve it refuses to enrol."""
    if config.feedback != "explicit":
        return None
    return FROM_DATA if config.rating_scale is None else tuple(config.rating_scale)


def start_sites_run(config: TrainingConfig) -> RunContext:
    """Enrol the sites of ``config.sites``, agree the catalogue, start the MLflow run; the
    returned context's client tasks are proxies of the enrolled sites."""
    assert config.sites is not None
    registry = read_registry(config.sites)
    registry.check_weights(private=config.dp_epsilon is not None, secure=config.secure_aggregation)
    api, uri = _servers(config)
    split = {
        "method": config.split,
        "valid_fraction": config.valid_fraction,
        "test_fraction": config.test_fraction,
        "positive_threshold": config.positive_threshold,
    }
    run = str(flow_run.get_id())
    link = SiteLink(registry, Transport(api, uri), run, config.seed, split, config.round_timeout)
    try:
        return _enrol(config, registry, link)
    except BaseException:
        link.stop()  # enrolments still waiting end within a tick
        if not config.keep_workspace:
            prune_exchange(link)
        raise


def prune_exchange(link: SiteLink) -> None:
    """Delete what an ended sites run leaves behind, whether it succeeded or not: its exchange
    files (catalogue, states, the sites' answers, which every site can read) from the artifact
    store, and its workspace (the catalogue, the manifest of counts, the sites' keys and the
    checkpoints, which serve only a resume, and a run of sites is trained again, not resumed)
    with the run's ``fedrec.workspace`` tag. A store that refuses, or a folder that cannot be
    removed, is left, with a warning."""
    logger = get_run_logger()
    try:
        folder = link.prune()
    except TransportError as err:
        logger.warning("could not remove the run's exchange files: %s", err)
    else:
        logger.info("removed the run's exchange files %s (--keep-workspace keeps them)", folder)
    if link.workspace is None:  # it ended before its sites enrolled: none was written
        return
    try:
        if not remove_workspace(link.workspace):
            return
    except OSError as err:
        logger.warning("could not remove the run's workspace %s: %s", link.workspace, err)
        return
    logger.info(
        "removed the run's workspace %s: a run of sites is trained again, not resumed "
        "(--keep-workspace keeps it)",
        link.workspace,
    )
    if link.tracking_uri is not None and link.tracking_run is not None:
        try:
            untag_run(link.tracking_uri, link.tracking_run, "fedrec.workspace")
        except Exception as err:  # the run has ended: a stale tag cannot change its outcome
            logger.warning("could not remove the run's fedrec.workspace tag: %s", err)


def _enrol(config: TrainingConfig, registry: Registry, link: SiteLink) -> RunContext:
    """:func:`start_sites_run` once the run's link to its sites exists."""
    logger = get_run_logger()
    if registry.catalogue is not None:  # sites then send no item ids
        link.publish_catalogue(registry.catalogue)
    futures = {
        site.client_id: enroll_site.with_options(task_run_name=f"enroll {site.name}").submit(
            link=quote(link), site=site, epsilon=config.dp_epsilon, rating_scale=_scale(config)
        )
        for site in registry.sites
    }
    failed: dict[int, str] = {}
    names = {site.client_id: site.name for site in registry.sites}
    enrolled = answered(futures, "enrolment", config.round_timeout, failed, names)
    if config.dp_epsilon is None:  # before any run starts: a run the sites would refuse
        private_only = [
            s.name
            for s in registry.sites
            if s.client_id in enrolled and not enrolled[s.client_id][1].get("exact")
        ]
        if private_only:
            raise SitesRefuseExact(
                f"only private runs are answered by {', '.join(private_only)}: give "
                "--dp-epsilon, or ask them to start `fedrec site run --allow-exact` (exact sums "
                "would then leave them, counted in no budget); not started"
            )
    require_quorum(len(enrolled), len(registry.sites), config, "enrolment", failed, names)
    sites = [s for s in registry.sites if s.client_id in enrolled]
    link.entries = {s.client_id: s for s in sites}
    link.left_out = {
        s.name: failed.get(s.client_id, "no answer")
        for s in registry.sites
        if s.client_id not in enrolled
    }
    catalogue = registry.catalogue
    if catalogue is None:
        catalogue = union_catalogue(enrolled[s.client_id][0] for s in sites)
        link.publish_catalogue(catalogue)
    entries = []
    for site in sites:
        info = enrolled[site.client_id][1]
        note = left_out_note(site.name, info)
        if note is not None:
            logger.warning(note)
        entries.append(
            ClientEntry(
                site.client_id,
                f"site:{site.name}",
                info["n_users"],  # noisy from a site that answers only private runs
                info.get("n_train"),  # the rows per split: only from a site that allows exact
                info.get("n_valid"),
                info.get("n_test"),
            )
        )
    prints = sorted(f"{s.name}:{enrolled[s.client_id][1].get('fingerprint', '')}" for s in sites)
    fingerprint = hashlib.sha256("\n".join(prints).encode()).hexdigest()
    manifest = Manifest(
        fingerprint,
        f"sites:{Path(config.sites).name}",
        len(catalogue),
        sum(e.n_users for e in entries),
        config.rating_scale,
        entries,
    )
    uri, run_id = start_run(config, fingerprint, link.run, clients=len(sites))
    workspace = config.workspace or str(fedrec_home() / "workspaces" / run_id)
    link.tracking_uri, link.tracking_run, link.workspace = uri, run_id, workspace
    record_enrolment(workspace=workspace, manifest=manifest, catalogue=catalogue)
    if config.secure_aggregation:  # the server steps verify the sites' round keys with these
        register_site_keys(workspace=workspace, sites=registry.sites)
    tags = {"fedrec.workspace": workspace, "fedrec.sites": ",".join(s.name for s in sites)}
    if link.left_out:  # the names, and each one's reason (MLflow keeps tags of 8,000 characters)
        tags["fedrec.sites_left_out"] = ",".join(link.left_out)
        why = "\n".join(f"{name}: {reason}" for name, reason in link.left_out.items())
        tags["fedrec.sites_left_out_why"] = _tag_text(why)
    tag_run(uri, run_id, tags)
    logger.info(
        "%d of %d sites enrolled (%s), %d items in the catalogue, MLflow run %s",
        len(sites),
        len(registry.sites),
        ", ".join(s.name for s in sites),
        len(catalogue),
        run_id,
    )
    if config.dp_epsilon is not None:
        logger.info(
            "privacy budget: the users' ids stay at the sites, so each site counts this run's "
            "releases against its own users' cap (fedrec site run --max-epsilon), not this ledger"
        )
    champion = load_champion(uri, config.registered_name)
    return RunContext(config, uri, run_id, workspace, manifest, catalogue, champion, sites=link)


#: on a sites run: each enrolled site the run went on without, the steps it missed and why
SITES_MISSED = "fedrec.sites_missed"


def missed_text(missed: dict[str, list[str]]) -> str:
    """:data:`SITES_MISSED`'s text: one line per site, its missed steps in the run's order."""
    return _tag_text("\n".join(f"{name}: {'; '.join(steps)}" for name, steps in missed.items()))


def _tag_text(text: str) -> str:
    """``text`` cut to the 8,000 characters MLflow keeps in a tag."""
    return text if len(text) <= 8000 else text[:7997] + "..."
