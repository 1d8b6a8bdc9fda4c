"""A family as JSON parameters, and the family a site builds from them.

The coordinator describes the family it trains by its hyperparameters only (numbers, strings,
booleans); a site rebuilds the same family with the code installed at the site. Only whitelisted
fields are read, and nothing that would make a site act against its own rows is accepted (an
attack simulation, for instance). The explicit-feedback family (ALS and the FedAvg variants,
with or without DP) and the neural family are supported.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

from models.federation.family import Family
from models.mf.family import ExplicitMF
from models.mf.federated import MFConfig
from models.neural.family import Neural, NeuralConfig
from models.neural.federated import FederatedConfig
from models.neural.training import TrainConfig
from models.privacy.dp import UserLevelDP
from models.privacy.released_metrics import MetricRelease
from models.sites.messages import RefusedMessage

SUPPORTED = ("explicit", "neural")
_NEURAL_FIELDS = {f.name for f in fields(NeuralConfig)}
_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
_FEDERATED_FIELDS = {f.name for f in fields(FederatedConfig)}
_MF_FIELDS = {f.name for f in fields(MFConfig)} - {"dp"}
_DP_FIELDS = {f.name for f in fields(UserLevelDP)}
_RELEASE_FIELDS = {f.name for f in fields(MetricRelease)}


def family_spec(family: Family) -> dict[str, Any]:
    """``family``'s hyperparameters as JSON values.

    Raises
    ------
    ValueError
        If the family cannot be built at a site yet.
    """
    if isinstance(family, Neural):
        return {"name": family.name, "config": asdict(family.config), "baseline": family.baseline}
    if not isinstance(family, ExplicitMF):
        raise ValueError(
            f"the {family.name} family cannot train at real sites yet; supported: "
            + ", ".join(SUPPORTED)
        )
    config = asdict(family.config)
    dp = config.pop("dp")
    return {
        "name": family.name,
        "config": config,
        "dp": dp,
        "ranking": family.ranking,
        "baseline": family.baseline,
        "released": None if family.released is None else asdict(family.released),
    }


def training_binding(spec: Mapping[str, Any], phase: str) -> str:
    """A digest of what a training update was computed under: the family spec as the request
    carries it (hyperparameters, DP bounds and noise) and the phase. A secure round's
    :attr:`~models.privacy.secagg_plus.RoundConfig.binding`: sites masking in one round must
    have trained under the same spec, so each adds the noise share the others count on."""
    canonical = json.dumps({"family": spec, "phase": phase}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _only(raw: Any, allowed: set[str], what: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise RefusedMessage(f"family {what} must be an object")
    unknown = set(raw) - allowed
    if unknown:
        raise RefusedMessage(f"family {what} has fields {sorted(unknown)} this site does not know")
    return dict(raw)


def family_from_spec(spec: Mapping[str, Any]) -> Family:
    """The family that :func:`family_spec` describes (without a catalogue: a site serves no
    model).

    Raises
    ------
    RefusedMessage
        If the family is unknown, a field is not whitelisted or a value is out of range.
    """
    spec = _only(spec, {"name", "config", "dp", "ranking", "baseline", "released"}, "spec")
    if spec.get("name") not in SUPPORTED:
        raise RefusedMessage(
            f"family {spec.get('name')!r} is not built at this site; supported: {', '.join(SUPPORTED)}"
        )
    if spec["name"] == "neural":
        return _neural(spec)
    config = _only(spec.get("config"), _MF_FIELDS, "config")
    if config.get("attack", "none") != "none" or config.get("attack_clients"):
        raise RefusedMessage("family config asks for an attack simulation: refused")
    for name in ("clip_to", "attack_clients"):
        if isinstance(config.get(name), list):
            config[name] = tuple(config[name])
    dp = None
    if spec.get("dp") is not None:
        try:
            dp = UserLevelDP(**_only(spec["dp"], _DP_FIELDS, "dp"))
        except (TypeError, ValueError) as err:
            raise RefusedMessage(f"family dp: {err}") from err
    released = None
    if spec.get("released") is not None:
        try:
            released = MetricRelease(**_only(spec["released"], _RELEASE_FIELDS, "released"))
        except (TypeError, ValueError) as err:
            raise RefusedMessage(f"family released: {err}") from err
    try:
        mf = MFConfig(**config, dp=dp)
    except (TypeError, ValueError) as err:
        raise RefusedMessage(f"family config: {err}") from err
    if not (isinstance(mf.n_factors, int) and 1 <= mf.n_factors <= 1024):
        raise RefusedMessage(f"family config n_factors {mf.n_factors!r} must be in 1..1024")
    if not (isinstance(mf.reg, int | float) and 1e-6 <= mf.reg <= 1e6):  # a fold-in stays finite
        raise RefusedMessage(f"family config reg {mf.reg!r} must be in 1e-6..1e6")
    return ExplicitMF(
        mf,
        None,
        ranking=bool(spec.get("ranking", True)),
        baseline=bool(spec.get("baseline", True)),
        released=released,
    )


def _neural(spec: Mapping[str, Any]) -> Neural:
    config = _only(spec.get("config"), _NEURAL_FIELDS, "config")
    try:
        train = TrainConfig(**_only(config.pop("train", {}), _TRAIN_FIELDS, "train"))
        federated = FederatedConfig(
            **_only(config.pop("federated", {}), _FEDERATED_FIELDS, "federated")
        )
        hidden = tuple(config.pop("hidden", ()))
        neural = NeuralConfig(hidden=hidden, train=train, federated=federated, **config)
    except (TypeError, ValueError) as err:
        raise RefusedMessage(f"family config: {err}") from err
    sizes = (*neural.hidden, neural.latent)
    if not all(isinstance(d, int) and 1 <= d <= 4096 for d in sizes):
        raise RefusedMessage(f"family config layer sizes {sizes} must be in 1..4096")
    return Neural(neural, baseline=bool(spec.get("baseline", True)))
