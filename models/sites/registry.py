"""The coordinator's list of sites (``sites.yaml``): names, identity keys, deadlines.

::

    coordinator_key: keys/coordinator.key   # the coordinator's private key (signs requests)
    precision: float64                      # optional: float32 packs the arrays exchanged
    compress: false                         # optional: deflate them too
    catalogue: items.csv                    # optional: the item ids (an item_id column) the
                                            # coordinator publishes; sites then send none
    sites:
      - name: shop-a                        # [a-z0-9][a-z0-9-]{0,39}
        public_key: keys/shop-a.pub         # a PEM file (relative to this file) or raw base64
        deadline_seconds: 600               # optional: how long a request to it may wait
        weight: 2                           # optional: its update counts twice (plain runs)

A site's client id in a run is its position in this list, so the list's order is part of the
run's configuration.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from models.privacy.identity import load_identity, public_bytes
from models.sites.catalogue import read_catalogue
from models.sites.messages import SITE_NAME

_TOP = {"coordinator_key", "sites", "precision", "compress", "catalogue"}
_SITE = {"name", "public_key", "deadline_seconds", "weight"}


class RegistryError(ValueError):
    """``sites.yaml`` is not valid; ``str(err)`` names the file, the entry and the field."""

    one_line = True  # the command line shows the message alone (exit 2: the file is to fix)


@dataclass(frozen=True)
class SiteSpec:
    """One site as the coordinator knows it."""

    name: str
    client_id: int
    public_key: Ed25519PublicKey
    deadline_seconds: float | None = None
    weight: int = 1  # the site's update counts as this many copies in the aggregation


@dataclass(frozen=True)
class Registry:
    """The sites of a federation and the coordinator's own key."""

    coordinator_key: Ed25519PrivateKey
    sites: tuple[SiteSpec, ...]
    precision: str = "float64"
    compress: bool = False
    catalogue: np.ndarray | None = field(default=None, compare=False)  # published item ids
    source: str = field(default="sites.yaml", compare=False)  # the file it was read from

    def by_name(self, name: str) -> SiteSpec | None:
        return next((s for s in self.sites if s.name == name), None)

    def check_weights(self, *, private: bool, secure: bool) -> None:
        """Refuse site weights in a private or secure run, in one line.

        Raises
        ------
        RegistryError
            A weight multiplies what each of the site's users contributes (past DP's bound),
            and needs the update in the clear (secure aggregation sums masked ones).
        """
        heavier = [s.name for s in self.sites if s.weight != 1]
        if heavier and (private or secure):
            raise RegistryError(
                f"{self.source}: weight on {', '.join(heavier)}: a weight multiplies what each of "
                "the site's users contributes (past DP's bound) and needs the update in the "
                "clear (secure aggregation sums masked ones); weights are for runs without "
                "--dp-epsilon and --secure-aggregation"
            )


def load_public_key(value: str, base: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (``value`` a path, relative to ``base``) or from
    raw base64 (32 bytes).

    Raises
    ------
    ValueError
        If neither reading gives an Ed25519 public key.
    """
    path = Path(value) if Path(value).is_absolute() else base / value
    if path.is_file():
        key = serialization.load_pem_public_key(path.read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
        return key
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(
            f"{path}: no such file, and {value!r} is not a base64 raw Ed25519 key either"
        )
    return Ed25519PublicKey.from_public_bytes(raw)


def parse_registry(raw: Any, base: Path, source: str = "sites.yaml") -> Registry:
    """A :class:`Registry` from parsed YAML; paths are relative to ``base``.

    Raises
    ------
    RegistryError
        For the first problem found, naming ``source``, the entry and the field.
    """
    if not isinstance(raw, Mapping):
        raise RegistryError(f"{source}: must be a mapping with coordinator_key and sites")
    unknown = set(raw) - _TOP
    if unknown:
        raise RegistryError(f"{source}: unknown keys {sorted(unknown)}; allowed: {sorted(_TOP)}")
    if "coordinator_key" not in raw or "sites" not in raw:
        raise RegistryError(f"{source}: needs coordinator_key and sites")
    key_path = Path(str(raw["coordinator_key"]))
    key_path = key_path if key_path.is_absolute() else base / key_path
    try:
        coordinator = load_identity(key_path)
    except (OSError, ValueError) as err:
        said = str(err).removeprefix(f"{key_path}: ")  # messages that name the file start so
        raise RegistryError(f"{source}: coordinator_key {key_path}: {said}") from err
    precision = raw.get("precision", "float64")
    if precision not in ("float64", "float32"):
        raise RegistryError(f"{source}: precision {precision!r}; allowed: float64, float32")
    compress = raw.get("compress", False)
    if not isinstance(compress, bool):
        raise RegistryError(f"{source}: compress {compress!r}; allowed: true, false")
    catalogue = None
    if raw.get("catalogue") is not None:
        path = Path(str(raw["catalogue"]))
        try:
            catalogue = read_catalogue(path if path.is_absolute() else base / path)
        except ValueError as err:
            raise RegistryError(f"{source}: catalogue {err}") from err
    entries = raw["sites"]
    if not isinstance(entries, list) or not entries:
        raise RegistryError(f"{source}: sites must be a non-empty list")
    sites: list[SiteSpec] = []
    for index, entry in enumerate(entries):
        where = f"{source}: sites[{index}]"
        if not isinstance(entry, Mapping):
            raise RegistryError(f"{where}: must be a mapping with name and public_key")
        unknown = set(entry) - _SITE
        if unknown:
            raise RegistryError(
                f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_SITE)}"
            )
        name = entry.get("name")
        if not isinstance(name, str) or not SITE_NAME.fullmatch(name):
            raise RegistryError(f"{where}: name {name!r} must match [a-z0-9][a-z0-9-]{{0,39}}")
        if any(s.name == name for s in sites):
            raise RegistryError(f"{where}: site name {name!r} appears twice")
        if "public_key" not in entry:
            raise RegistryError(f"{where} ({name}): needs public_key")
        try:
            public = load_public_key(str(entry["public_key"]), base)
        except ValueError as err:
            raise RegistryError(f"{where} ({name}): public_key: {err}") from err
        deadline = entry.get("deadline_seconds")
        if deadline is not None and (
            isinstance(deadline, bool) or not isinstance(deadline, int | float) or deadline <= 0
        ):
            raise RegistryError(f"{where} ({name}): deadline_seconds {deadline!r} must be > 0")
        weight = entry.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise RegistryError(f"{where} ({name}): weight {weight!r} must be a positive integer")
        seconds = None if deadline is None else float(deadline)
        sites.append(SiteSpec(name, index, public, seconds, weight))
    keys = [s.public_key.public_bytes_raw() for s in sites]
    if len(set(keys)) != len(keys):
        first = next(k for k in keys if keys.count(k) > 1)
        named = " and ".join(s.name for s, k in zip(sites, keys, strict=True) if k == first)
        raise RegistryError(
            f"{source}: sites {named} share one public key; allowed: each site's own key"
        )
    return Registry(coordinator, tuple(sites), precision, compress, catalogue, str(source))


def read_registry(path: str | Path) -> Registry:
    """:func:`parse_registry` of a YAML file.

    Raises
    ------
    RegistryError
        If the file is missing, not YAML, or not a valid registry.
    """
    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"{path}: no such sites file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RegistryError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
    return parse_registry(raw, path.parent, str(path))


def read_peers(path: str | Path) -> frozenset[bytes]:
    """The raw public keys of a federation's sites, as a site pins them: a ``sites.yaml``
    (its ``coordinator_key`` and other fields are ignored, so the coordinator can hand out the
    file without its private key) whose ``sites`` entries each name a ``public_key``.

    Raises
    ------
    RegistryError
        If the file is missing, not YAML, or an entry's key cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"{path}: no such peers file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RegistryError(f"{path}: not YAML ({err.__class__.__name__})") from err
    entries = raw.get("sites") if isinstance(raw, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise RegistryError(f"{path}: needs a non-empty list 'sites' of entries with public_key")
    keys = set()
    for index, entry in enumerate(entries):
        value = entry.get("public_key") if isinstance(entry, Mapping) else None
        if not isinstance(value, str):
            raise RegistryError(f"{path}: sites[{index}] has no public_key")
        try:
            keys.add(public_bytes(load_public_key(value, path.parent)))
        except ValueError as err:
            raise RegistryError(f"{path}: sites[{index}].public_key: {err}") from err
    return frozenset(keys)
