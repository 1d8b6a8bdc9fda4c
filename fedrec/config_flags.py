"""The flags of ``fedrec train``: one per :class:`~fedrec.config.TrainingConfig` field.

Importing ``fedrec.config`` loads the core (pandas, scikit-learn, LightGBM: seconds), only to read
field names, types, help texts and defaults. This module keeps that description in a small JSON
file next to the bytecode (``fedrec/__pycache__``), keyed on the size and modification time of
every source file the fields are built from, and rebuilds it from ``TrainingConfig`` whenever one
of them changes. So ``fedrec train --help`` and the input checks run without loading the core,
and the flags still come from the config model alone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import click

# Config fields without a flag of their own: set them in the --config YAML file.
FILE_ONLY = frozenset({
    "local_epochs", "local_lr",
    "batch_size", "prox_mu", "server_lr", "relevance_threshold", "task_retries",
    "max_client_regression", "fault_clients", "fault_dropout_clients",
})  # fmt: skip

# The sections of ``fedrec train --help``, in order, and each option's section (keyed on the config
# field or the click parameter name); an option not listed here goes to "runtime".
GROUP_ORDER = ("data", "model", "federation", "privacy", "reliability", "tracking", "runtime")
GROUPS: dict[str, str] = {
    **dict.fromkeys(("data", "train", "valid", "test", "catalogue", "user_col", "item_col", "rating_col",
                     "timestamp_col", "rating_scale", "synthetic_users", "synthetic_items",
                     "synthetic_interactions", "synthetic_taste", "synthetic_seed", "split", "valid_fraction",
                     "test_fraction", "feedback", "positive_threshold", "repeats"), "data"),
    **dict.fromkeys(("algorithm", "factors", "reg", "alpha", "neighbours", "candidates",
                     "implicit_model", "neural_network", "neural_latent", "neural_hidden",
                     "neural_lr", "neural_batch_size", "neural_local_epochs", "neural_server",
                     "ranker", "ranker_rounds", "ranker_trees", "ranker_learning_rate",
                     "ranker_leaves", "ranker_objective", "ranker_network_rounds", "ease_reg",
                     "slim_iterations", "top_k"), "model"),
    **dict.fromkeys(("clients", "partition", "cohort_size", "dirichlet_alpha", "partition_key",
                     "key_prefix", "rounds", "client_fraction", "eval_every", "aggregation",
                     "trim", "clip_factor", "min_clients", "min_fraction", "sites"), "federation"),
    **dict.fromkeys(("dp_epsilon", "dp_delta", "dp_max_items", "dp_budget", "dp_budget_delta",
                     "dp_ledger_set_cap", "dp_ledger_secret", "secure_aggregation"), "privacy"),
    **dict.fromkeys(("retry_backoff", "round_timeout", "round_retries", "fault_probability",
                     "fault_delay", "attack", "attack_fraction", "attack_scale", "resume"),
                    "reliability"),
    **dict.fromkeys(("experiment", "model_name", "tracking_uri", "promotion_metric", "min_delta",
                     "warm_start", "skip_if_unchanged"), "tracking"),
    **dict.fromkeys(("task_runner", "dask_address", "seed", "workspace", "keep_workspace",
                     "max_workers", "config_file", "as_json", "debug", "help"), "runtime"),
}  # fmt: skip
_DEFAULT_IN_HELP = re.compile(r"\bdefault\b", re.IGNORECASE)

_FORMAT = 1  # bump when the shape of a field's description below changes
_CACHE = Path(__file__).resolve().parent / "__pycache__" / "train_flags.json"


def _sources() -> list[Path]:
    """Files whose contents shape TrainingConfig's fields: the config, this module, the core."""
    here = Path(__file__).resolve().parent
    files = [here / "config.py", here / "config_flags.py", here / "home.py", here / "inputs.py"]
    spec = importlib.util.find_spec("models")  # locates the package without importing it
    for root in (spec.submodule_search_locations or []) if spec else []:
        files.extend(sorted(Path(root).rglob("*.py")))
    return files


def _key() -> str:
    digest = hashlib.sha256(f"{_FORMAT}".encode())
    for path in _sources():
        try:
            stat = path.stat()
        except OSError:
            continue
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def describe_fields() -> list[dict[str, Any]]:
    """Each TrainingConfig field as plain data: name, kind, choices, help, default."""
    from fedrec.config import TrainingConfig

    fields = []
    for name, field in TrainingConfig.model_fields.items():
        annotation = field.annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
            annotation = args[0]
        choices = None
        if typing.get_origin(annotation) is typing.Literal:
            kind, choices = "choice", [str(a) for a in typing.get_args(annotation)]
        elif annotation in (bool, int, float, str):
            kind = annotation.__name__
        else:
            kind = "str"
        fields.append({
            "name": name, "kind": kind, "choices": choices, "help": field.description,
            "default": json.loads(json.dumps(field.default, default=str)),
            "default_text": (",".join(map(str, field.default))
                             if isinstance(field.default, tuple) else str(field.default)),
        })  # fmt: skip
    return fields


def config_fields() -> list[dict[str, Any]]:
    """``describe_fields()``, from the cache while the sources are unchanged."""
    key = _key()
    try:
        cached = json.loads(_CACHE.read_text())
        if cached.get("key") == key:
            return cached["fields"]
    except (OSError, ValueError, AttributeError):
        pass
    fields = describe_fields()
    try:  # a read-only install simply rebuilds each time
        _CACHE.parent.mkdir(exist_ok=True)
        temporary = _CACHE.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"key": key, "fields": fields}))
        temporary.replace(_CACHE)
    except OSError:
        pass
    return fields


def config_defaults() -> dict[str, Any]:
    """Every field's default (tuples as lists), without importing the config."""
    return {field["name"]: field["default"] for field in config_fields()}


def shown_default(field: dict[str, Any]) -> str | None:
    """The one default ``--help`` shows for a field: None when its help text states it (a default
    that depends on other flags, "(default: 32 explicit, 64 implicit)"), else the field's own."""
    if _DEFAULT_IN_HELP.search(field["help"] or ""):
        return None
    if field["kind"] == "bool":
        return "on" if field["default"] else "off"
    return "not set" if field["default"] is None else field["default_text"]


def _help(field: dict[str, Any]) -> str:
    default = shown_default(field)
    return field["help"] if default is None else f"{field['help']} [default: {default}]"


def config_options() -> list[click.Option]:
    """One option per field outside FILE_ONLY; its default is None, so that only the flags given
    override the YAML file and the config's own defaults."""
    options = []
    for field in config_fields():
        if field["name"] in FILE_ONLY:
            continue
        flag = "--" + field["name"].replace("_", "-")
        if field["kind"] == "bool":  # --secure-aggregation / --no-secure-aggregation
            options.append(click.Option([f"{flag}/--no-{flag[2:]}", field["name"]], default=None,
                                        help=_help(field)))  # fmt: skip
            continue
        kind: Any = {"int": int, "float": float, "str": str}.get(field["kind"], str)
        if field["kind"] == "choice":
            kind = click.Choice(field["choices"])
        options.append(click.Option([flag, field["name"]], type=kind, default=None,
                                    help=_help(field)))  # fmt: skip
    return options


class ConfigCommand(click.Command):
    """A command whose options start with one per TrainingConfig field, added on first use, so
    that listing the commands (``fedrec --help``) does not need them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._with_config_options = False

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._with_config_options:
            self.params[:0] = config_options()
            self._with_config_options = True
        return super().get_params(ctx)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The options in sections (data, model, federation, ...) instead of one long list."""
        sections: dict[str, list[tuple[str, str]]] = {group: [] for group in GROUP_ORDER}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections[GROUPS.get(param.name or "", "runtime")].append(record)
        for group, records in sections.items():
            if records:
                with formatter.section(f"{group.capitalize()} options"):
                    formatter.write_dl(records)
