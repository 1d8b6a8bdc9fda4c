"""Signed JSON manifests exchanged between the coordinator and its sites.

Every manifest is ``{"body": {...}, "sig": base64(ed25519(canonical(body)))}``: the body is
canonical JSON (sorted keys, no spaces, no NaN), carries the protocol's ``domain`` and the
message's ``purpose``, and is signed with the sender's long-term identity key
(:mod:`models.privacy.identity`). Arrays never travel inside a manifest: a manifest names them
by :class:`BlobRef` (path, sha256, size), so the signature pins their bytes too; an answer's
file is sealed to the key its request names (:mod:`models.sites.sealing`).

Five purposes exist:

- ``round-request`` (coordinator -> site): one exchange of a run, see :class:`RoundRequest`.
- ``round-answer`` (site -> coordinator): the answer's arrays, see :class:`RoundAnswer`.
- ``refusal`` (site -> coordinator): why the site will not answer a request, in one line.
- ``unverified-request`` (site -> coordinator): a request to the site did not verify against
  the coordinator key the site holds; it names the exact manifest it got (its sha256), so that
  the coordinator stops waiting only when its own request was the one refused.
- ``site-alive`` (site -> coordinator): the site's process is up at ``at`` (its clock) and says
  so every ``every`` seconds, or has ``stopped``; see :func:`check_alive`.

Whoever receives a manifest calls :func:`open_message` (size cap, structure, domain, purpose,
signature), then the purpose's ``check_*`` function (fields, expiry, who and what it answers).
Each refusal is a :class:`RefusedMessage` with a one-line reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from models.privacy.identity import public_bytes

DOMAIN = "fedrec/sites/v1"
REQUEST, ANSWER, REFUSAL = "round-request", "round-answer", "refusal"
UNVERIFIED, ALIVE = "unverified-request", "site-alive"
PURPOSES = (REQUEST, ANSWER, REFUSAL, UNVERIFIED, ALIVE)
CLOCK_SKEW = 60.0  # seconds a site's clock and the coordinator's may differ, both ways
MAX_MANIFEST_BYTES = 64 * 1024  # a manifest is a few hundred bytes; anything near this is abuse
SITE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
_NONCE = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PATH = re.compile(r"[A-Za-z0-9._/-]{1,512}")
_ANSWER_KEY = re.compile(r"[A-Za-z0-9+/]{43}=")  # base64 of a 32-byte X25519 public key
Kind = Literal["enroll", "train", "evaluate", "secagg"]
KINDS = ("enroll", "train", "evaluate", "secagg")
ENROL_PHASES = ("private", "exact")  # an enrolment says whether the run will be private
FROM_DATA = "data"  # an enrolment's rating scale when the run takes it from the data


class RefusedMessage(ValueError):
    """A manifest that is refused; ``str(err)`` is the one-line reason."""


def canonical(body: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, finite numbers only.

    Raises
    ------
    RefusedMessage
        If ``body`` holds NaN or infinity (JSON has no such numbers) or a non-JSON value.
    """
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (ValueError, TypeError) as err:
        raise RefusedMessage(f"not canonical JSON: {err}") from err


def exchange_name(kind: str, phase: str, round_: int, label: str = "") -> str:
    """An exchange as log lines name it: ``train round 3``, ``train mean round 0``,
    ``secagg mask round 3`` (a phase named like its kind is said once); an evaluation by what
    it evaluates (its label: ``evaluate round-8``, ``evaluate champion``), an enrolment as
    ``enroll``."""
    if kind not in ("train", "secagg"):
        return " ".join(part for part in (kind, label) if part)
    return " ".join(
        part for part in (kind, "" if phase == kind else phase, f"round {round_}") if part
    )


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """A short public name of an identity key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_bytes(key)).hexdigest()[:16]


def body_digest(body: Mapping[str, Any]) -> str:
    """The sha256 (hex) of a body's canonical bytes: how an answer names the request it answers."""
    return hashlib.sha256(canonical(body)).hexdigest()


def sign_message(key: Ed25519PrivateKey, purpose: str, fields: Mapping[str, Any]) -> dict:
    """A signed manifest of ``purpose`` holding ``fields``.

    Raises
    ------
    ValueError
        If ``purpose`` is unknown or ``fields`` set ``domain``/``purpose`` themselves.
    RefusedMessage
        If ``fields`` are not canonical JSON (e.g. hold NaN).
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose {purpose!r} is unknown; allowed: {', '.join(PURPOSES)}")
    if {"domain", "purpose"} & set(fields):
        raise ValueError("fields must not set 'domain' or 'purpose'")
    body = {"domain": DOMAIN, "purpose": purpose, **fields}
    signature = key.sign(canonical(body))
    return {"body": body, "sig": base64.b64encode(signature).decode()}


def manifest_bytes(signed: Mapping[str, Any]) -> bytes:
    """A signed manifest as the bytes that are stored or posted."""
    return canonical(signed)


def parse_manifest(data: bytes) -> dict:
    """A manifest read from bytes, size-capped before parsing (NaN/Infinity refused).

    Raises
    ------
    RefusedMessage
        If the bytes are over :data:`MAX_MANIFEST_BYTES` or not a JSON object.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise RefusedMessage(f"manifest of {len(data)} bytes, the limit is {MAX_MANIFEST_BYTES}")

    def no_constant(name: str) -> Any:
        raise RefusedMessage(f"manifest holds {name}, which is not a JSON number")

    try:
        parsed = json.loads(data, parse_constant=no_constant)
    except RecursionError:
        raise RefusedMessage("manifest is nested too deeply to be one") from None
    except (ValueError, UnicodeDecodeError) as err:
        if isinstance(err, RefusedMessage):
            raise
        raise RefusedMessage(f"manifest is not JSON: {err}") from err
    if not isinstance(parsed, dict):
        raise RefusedMessage(f"manifest is a JSON {type(parsed).__name__}, expected an object")
    return parsed


def open_message(
    signed: Mapping[str, Any] | bytes, public: Ed25519PublicKey, purpose: str
) -> dict[str, Any]:
    """The body of a signed manifest of ``purpose``, after checking its size, structure, domain,
    purpose and signature against ``public``.

    Raises
    ------
    RefusedMessage
        With the first check that fails, in one line.
    """
    if isinstance(signed, bytes | bytearray):
        signed = parse_manifest(bytes(signed))
    elif len(canonical(signed)) > MAX_MANIFEST_BYTES:
        raise RefusedMessage(f"manifest over {MAX_MANIFEST_BYTES} bytes")
    if set(signed) != {"body", "sig"}:
        raise RefusedMessage(f"manifest has fields {sorted(signed)}, expected ['body', 'sig']")
    body, sig = signed["body"], signed["sig"]
    if not isinstance(body, dict) or not isinstance(sig, str):
        raise RefusedMessage("manifest body must be an object and sig a base64 string")
    if body.get("domain") != DOMAIN:
        raise RefusedMessage(f"domain {body.get('domain')!r}, expected {DOMAIN!r}")
    if body.get("purpose") != purpose:
        raise RefusedMessage(f"purpose {body.get('purpose')!r}, expected {purpose!r}")
    try:
        signature = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RefusedMessage("signature is not base64") from err
    try:
        public.verify(signature, canonical(body))
    except InvalidSignature as err:
        raise RefusedMessage(f"signature does not verify against key {key_id(public)}") from err
    return dict(body)


@dataclass(frozen=True)
class BlobRef:
    """Where an array file is, and the sha256 and size its bytes must have."""

    path: str
    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: str, data: bytes) -> BlobRef:
        """The reference of ``data`` stored at ``path``."""
        return cls(path, hashlib.sha256(data).hexdigest(), len(data))

    @classmethod
    def from_json(cls, raw: Any, what: str) -> BlobRef:
        """Checked: a relative path of safe characters (no ``..``), a sha256, a size >= 0."""
        if not isinstance(raw, dict) or set(raw) != {"path", "sha256", "bytes"}:
            raise RefusedMessage(f"{what} must be an object with path, sha256 and bytes")
        path, sha, size = raw["path"], raw["sha256"], raw["bytes"]
        if not isinstance(path, str) or not _PATH.fullmatch(path) or ".." in path.split("/"):
            raise RefusedMessage(f"{what}.path {path!r} is not a safe relative path")
        if path.startswith("/"):
            raise RefusedMessage(f"{what}.path {path!r} must be relative")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise RefusedMessage(f"{what}.sha256 is not 64 lowercase hex digits")
        if not _is_int(size) or size < 0:
            raise RefusedMessage(f"{what}.bytes {size!r} must be an integer >= 0")
        return cls(path, sha, size)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class RoundRequest:
    """One exchange the coordinator asks of one site.

    Attributes
    ----------
    run : str
        The coordinator's run (its Prefect flow run id).
    kind : {"enroll", "train", "evaluate", "secagg"}
        Enrol (what the coordinator's manifest holds about the site), train (evaluate ``state`` on
        ``eval_splits`` first, then compute the update of ``phase``), evaluate ``state``, or
        answer one step of secure aggregation (``phase`` names the step, ``message`` holds the
        server's protocol message, :mod:`fedrec.sites.secure`).
    phase, round : str, int
        The family's phase and the round (0 for ``evaluate`` and ``enroll``); for ``enroll``
        the phase is ``private`` or ``exact``: whether the run's answers will carry DP noise
        (:data:`ENROL_PHASES`).
    label : str
        What an ``evaluate`` request evaluates: ``round-3`` (the global model after round 3),
        ``champion``; it tells the evaluations of one run apart.
    site, client_id : str, int
        Whom the request is for, and its client id in the run (``sites.yaml`` order).
    nonce : str
        128 random bits (hex) naming this request; the answer repeats it.
    issued_at, expires_at : float
        Unix seconds.
    reply_to : str
        The artifact-store folder the site writes its answer files under.
    seed : int
        The run seed: the site's data split and its random streams derive from it (a private
        family's streams come from the site's own entropy instead).
    split : dict
        ``method``, ``valid_fraction``, ``test_fraction`` of the site's train/valid/test split,
        and for implicit feedback ``positive_threshold`` (rows rated below it are dropped first).
    family : dict
        The family and its hyperparameters (:mod:`models.sites.spec`); empty for ``enroll``.
    state, catalogue : BlobRef or None
        The global state's and the catalogue's npz.
    eval_splits : list of str
    devices : float or None
        Per-user sampling inside the site (a private run's Poisson sampling of users).
    release : dict or None
        A private final evaluation's :class:`~models.privacy.released_metrics.MetricRelease`.
    flow_run_id, task_run_id : str
        The coordinator's proxy task run that waits for the answer (log lines go there).
    precision : {"float64", "float32"}
        How the site packs the floats of its answer (:mod:`models.sites.encoding`).
    compress : bool
        Whether the site deflates its answer's npz.
    secure : dict or None
        Secure aggregation: ``registry`` (client id -> base64 Ed25519 public key of every site,
        from ``sites.yaml``) and, for a ``secagg`` step, ``round`` (the protocol's round
        configuration). On a ``train`` request the site keeps its update and answers a receipt.
    message : BlobRef or None
        A ``secagg`` step's protocol message (:mod:`models.privacy.secagg_plus`, no pickle).
    epsilon : float or None
        A private ``enroll``'s epsilon: what the run's noise is calibrated to, its training and
        final evaluations composed. A site that cannot spend that much refuses to enrol before
        it counts anything; it still charges each release as its own accountant counts it.
    answer_key : str
        The run's X25519 public key (base64) the site seals its answer to
        (:mod:`models.sites.sealing`): only the coordinator of this run can read the answer.
    rating_scale : (float, float), "data" or None
        An ``enroll`` of a run that trains a rating model (explicit feedback): the run's rating
        scale (low, high), or ``"data"`` when the run takes it from the data; None for a run
        without ratings. A site whose data has no ratings, or ratings on another scale, refuses
        to enrol (:data:`FROM_DATA`).
    """

    run: str
    kind: Kind
    phase: str
    round: int
    label: str
    site: str
    client_id: int
    nonce: str
    issued_at: float
    expires_at: float
    reply_to: str
    seed: int
    split: dict[str, Any]
    family: dict[str, Any] = field(default_factory=dict)
    state: BlobRef | None = None
    catalogue: BlobRef | None = None
    eval_splits: tuple[str, ...] = ()
    devices: float | None = None
    release: dict[str, float] | None = None
    flow_run_id: str = ""
    task_run_id: str = ""
    precision: str = "float64"  # how the site encodes its answer's floats (float32 packs them)
    compress: bool = False  # deflate the answer's npz
    secure: dict[str, Any] | None = None
    message: BlobRef | None = None
    epsilon: float | None = None
    answer_key: str = ""
    rating_scale: tuple[float, float] | str | None = None

    def fields(self) -> dict[str, Any]:
        """The manifest fields (JSON values); ``epsilon`` and ``rating_scale`` only when set, so
        that the requests without them read as they did before the fields."""
        out = asdict(self)
        out["eval_splits"] = list(self.eval_splits)
        for name in ("epsilon", "rating_scale"):
            if out[name] is None:
                del out[name]
        if self.rating_scale is not None and self.rating_scale != FROM_DATA:
            out["rating_scale"] = list(self.rating_scale)
        return out

    @property
    def name(self) -> str:
        """The exchange as log lines name it (:func:`exchange_name`)."""
        return exchange_name(self.kind, self.phase, self.round, self.label)

    @property
    def record_key(self) -> tuple[str, str, str, int, str]:
        """What a retried request repeats: (run, kind, phase, round, label)."""
        return (self.run, self.kind, self.phase, self.round, self.label)


_SPLIT_METHODS = ("random", "temporal")


def check_request(
    body: Mapping[str, Any], *, site: str, now: float, skew: float = CLOCK_SKEW
) -> RoundRequest:
    """A verified request body (:func:`open_message`) as a :class:`RoundRequest`, refused when
    it is not for ``site``, has expired (``skew`` seconds of clock difference allowed), was
    issued in the future, or any field is missing, extra or of the wrong type.

    Raises
    ------
    RefusedMessage
    """
    fields = {k: v for k, v in body.items() if k not in ("domain", "purpose")}
    known = {f for f in RoundRequest.__dataclass_fields__}
    needed = {"run", "kind", "site", "nonce", "round", "answer_key"}
    extra, missing = set(fields) - known, needed - set(fields)
    if extra:
        raise RefusedMessage(f"request has unknown fields {sorted(extra)}")
    if missing:
        raise RefusedMessage(f"request lacks fields {sorted(missing)}")
    if fields["site"] != site:
        raise RefusedMessage(f"request is for site {fields['site']!r}, this is {site!r}")
    if fields["kind"] not in KINDS:
        raise RefusedMessage(f"request kind {fields['kind']!r}; allowed: {', '.join(KINDS)}")
    if not isinstance(fields["nonce"], str) or not _NONCE.fullmatch(fields["nonce"]):
        raise RefusedMessage("request nonce must be 32 lowercase hex digits")
    for name in ("run", "phase", "label", "reply_to", "flow_run_id", "task_run_id"):
        if not isinstance(fields.get(name, ""), str):
            raise RefusedMessage(f"request field {name} must be a string")
    if fields["kind"] == "enroll" and fields.get("phase") not in ENROL_PHASES:
        raise RefusedMessage(
            f"enrolment phase {fields.get('phase')!r}; allowed: {', '.join(ENROL_PHASES)}"
        )
    for name in ("round", "client_id", "seed"):
        if not _is_int(fields.get(name)) or fields[name] < 0:
            raise RefusedMessage(f"request field {name} must be an integer >= 0")
    for name in ("issued_at", "expires_at"):
        if not _is_number(fields.get(name)):
            raise RefusedMessage(f"request field {name} must be a finite number")
    if fields["expires_at"] + skew < now:
        raise RefusedMessage(
            f"request expired {now - fields['expires_at']:.0f} s ago (run {fields['run']}, "
            f"round {fields['round']})"
        )
    if fields["issued_at"] - skew > now:
        raise RefusedMessage(f"request issued {fields['issued_at'] - now:.0f} s in the future")
    if not isinstance(fields["answer_key"], str) or not _ANSWER_KEY.fullmatch(fields["answer_key"]):
        raise RefusedMessage("request answer_key must be base64 of a 32-byte X25519 public key")
    reply = fields["reply_to"]
    if not _PATH.fullmatch(reply) or ".." in reply.split("/") or reply.startswith("/"):
        raise RefusedMessage(f"request reply_to {reply!r} is not a safe relative path")
    split = fields.get("split")
    needed = {"method", "valid_fraction", "test_fraction"}
    if not isinstance(split, dict) or not needed <= set(split) <= needed | {"positive_threshold"}:
        raise RefusedMessage(
            "request split must hold method, valid_fraction, test_fraction "
            "(and optionally positive_threshold)"
        )
    threshold = split.get("positive_threshold")
    if (
        split["method"] not in _SPLIT_METHODS
        or not all(
            _is_number(split[f]) and 0 <= split[f] < 1 for f in ("valid_fraction", "test_fraction")
        )
        or (threshold is not None and not _is_number(threshold))
    ):
        raise RefusedMessage(f"request split {split} is not a valid split")
    splits = fields.get("eval_splits", [])
    if not isinstance(splits, list) or not all(s in ("train", "valid", "test") for s in splits):
        raise RefusedMessage(f"request eval_splits {splits!r}; allowed: train, valid, test")
    devices = fields.get("devices")
    if devices is not None and not (_is_number(devices) and 0 < devices <= 1):
        raise RefusedMessage(f"request devices {devices!r} must be in (0, 1]")
    epsilon = fields.get("epsilon")
    if epsilon is not None and not (
        fields["kind"] == "enroll" and _is_number(epsilon) and epsilon > 0
    ):
        raise RefusedMessage(
            f"request epsilon {epsilon!r}; allowed: a positive number, on an enrolment only"
        )
    scale = _rating_scale(fields)
    release = fields.get("release")
    if release is not None and not (
        isinstance(release, dict) and all(_is_number(v) for v in release.values())
    ):
        raise RefusedMessage("request release must be an object of numbers")
    if not isinstance(fields.get("family", {}), dict):
        raise RefusedMessage("request family must be an object")
    if not isinstance(fields.get("compress", False), bool):
        raise RefusedMessage("request compress must be true or false")
    if fields.get("precision", "float64") not in ("float64", "float32"):
        raise RefusedMessage(
            f"request precision {fields['precision']!r}; allowed: float64, float32"
        )
    secure = fields.get("secure")
    if secure is not None and not (
        isinstance(secure, dict) and set(secure) <= {"registry", "round"}
    ):
        raise RefusedMessage("request secure must be an object of registry (and round)")
    refs = {
        name: None if fields.get(name) is None else BlobRef.from_json(fields[name], name)
        for name in ("state", "catalogue", "message")
    }
    if fields["kind"] == "secagg" and (secure is None or "round" not in secure):
        raise RefusedMessage("a secagg request needs its secure round")
    if fields["kind"] in ("train", "evaluate") and (
        refs["state"] is None or refs["catalogue"] is None
    ):
        raise RefusedMessage(f"a {fields['kind']} request needs a state and a catalogue")
    return RoundRequest(**(fields | refs | {"eval_splits": tuple(splits), "rating_scale": scale}))


def _rating_scale(fields: Mapping[str, Any]) -> tuple[float, float] | str | None:
    """A request's ``rating_scale``: (low, high) or :data:`FROM_DATA`, on an enrolment only.

    Raises
    ------
    RefusedMessage
    """
    scale = fields.get("rating_scale")
    if scale is None or (scale == FROM_DATA and fields["kind"] == "enroll"):
        return scale
    if fields["kind"] != "enroll":
        raise RefusedMessage(
            f"request rating_scale {scale!r} on a {fields['kind']} request; allowed: on an "
            "enrolment only"
        )
    if not (
        isinstance(scale, list)
        and len(scale) == 2
        and all(_is_number(bound) for bound in scale)
        and scale[0] < scale[1]
    ):
        raise RefusedMessage(
            f"request rating_scale {scale!r}; allowed: LOW,HIGH (two finite numbers, LOW < "
            f"HIGH) or {FROM_DATA!r}"
        )
    return float(scale[0]), float(scale[1])


@dataclass(frozen=True)
class RoundAnswer:
    """A site's answer to one request.

    Attributes
    ----------
    run, kind, phase, round, label, site, nonce
        As in the request answered.
    request_sha256 : str
        :func:`body_digest` of the request's body.
    answer : BlobRef
        The answer's npz (:func:`models.protocol.answer_arrays`; for ``enroll`` the item ids)
        with its info, sealed to the request's ``answer_key`` (:mod:`models.sites.sealing`).
    info : dict
        Numbers the coordinator may see beside the arrays: for ``enroll`` the site's users and
        rows per split, a fingerprint of its rows keyed with the site's secret, and whether it
        answers requests without DP (``exact``); the seconds the site spent. They travel
        sealed with the arrays: the signed manifest on the API carries an empty ``info``.
    """

    run: str
    kind: str
    phase: str
    round: int
    label: str
    site: str
    nonce: str
    request_sha256: str
    answer: BlobRef
    info: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        return asdict(self)


def answer_for(
    request: RoundRequest,
    request_sha256: str,
    answer: BlobRef,
    info: Mapping[str, Any] | None = None,
) -> RoundAnswer:
    """The answer to ``request`` whose arrays are at ``answer``."""
    return RoundAnswer(
        request.run,
        request.kind,
        request.phase,
        request.round,
        request.label,
        request.site,
        request.nonce,
        request_sha256,
        answer,
        dict(info or {}),
    )


def check_answer(
    body: Mapping[str, Any], request: RoundRequest, request_sha256: str
) -> RoundAnswer:
    """A verified answer body as a :class:`RoundAnswer`, refused unless it answers exactly
    ``request`` (run, kind, phase, round, label, site, nonce and the request's digest).

    Raises
    ------
    RefusedMessage
    """
    fields = {k: v for k, v in body.items() if k not in ("domain", "purpose")}
    known = set(RoundAnswer.__dataclass_fields__)
    if set(fields) != known:
        raise RefusedMessage(f"answer fields {sorted(fields)} differ from {sorted(known)}")
    for name in ("site", "run", "kind", "phase", "round", "label", "nonce"):
        if fields[name] != getattr(request, name):
            raise RefusedMessage(
                f"answer for {name} {fields[name]!r}, the request was for {getattr(request, name)!r}"
            )
    if fields["request_sha256"] != request_sha256:
        raise RefusedMessage("answer names another request (request digest differs)")
    check_info(fields["info"])
    return RoundAnswer(**(fields | {"answer": BlobRef.from_json(fields["answer"], "answer")}))


_INFO_TOKEN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # a key id, a SHA-256 in hex


def check_info(info: Any) -> dict[str, Any]:
    """An answer's info: an object of numbers and short tokens (a key id), so that nothing a
    site writes there reaches the coordinator's log lines as text of its choosing.

    Raises
    ------
    RefusedMessage
    """
    if not isinstance(info, dict) or not all(
        isinstance(k, str)
        and _INFO_TOKEN.fullmatch(k)
        and (_is_number(v) or (isinstance(v, str) and _INFO_TOKEN.fullmatch(v)))
        for k, v in info.items()
    ):
        raise RefusedMessage(
            "answer info must be an object of numbers and short tokens (letters, digits, "
            "'_.:-', at most 128)"
        )
    return info


def refusal_fields(request: RoundRequest, reason: str) -> dict[str, Any]:
    """The fields of a refusal of ``request``, the reason on one line."""
    return _refusal(request.run, request.round, request.site, request.nonce, reason)


def _refusal(run: str, round_: int, site: str, nonce: str, reason: str) -> dict[str, Any]:
    return {
        "run": run,
        "round": round_,
        "site": site,
        "nonce": nonce,
        "reason": " ".join(reason.split())[:500],
    }


def refusal_of_body(body: Mapping[str, Any], reason: str) -> dict[str, Any] | None:
    """The fields of a refusal of a request body that :func:`check_request` refused (another
    protocol version, a field out of range), when the body names its run, round, site and
    nonce well enough for the coordinator to match it; otherwise None."""
    run, round_, site, nonce = (body.get(k) for k in ("run", "round", "site", "nonce"))
    if not (isinstance(run, str) and 0 < len(run) <= 100 and _is_int(round_) and round_ >= 0):
        return None
    if not (isinstance(site, str) and isinstance(nonce, str) and _NONCE.fullmatch(nonce)):
        return None
    return _refusal(run, round_, site, nonce, reason)


def manifest_digest(signed: Mapping[str, Any]) -> str:
    """The sha256 (hex) of a whole signed manifest, signature included."""
    return hashlib.sha256(manifest_bytes(signed)).hexdigest()


def unverified_fields(
    signed: Mapping[str, Any], reason: str, expects: Ed25519PublicKey
) -> dict[str, Any] | None:
    """The fields of an ``unverified-request`` notice about ``signed`` (a manifest whose body
    names a request that did not verify against ``expects``, the key the site holds), or None
    when its body does not name a request (:func:`refusal_of_body`)."""
    body = signed.get("body")
    if not isinstance(body, dict) or body.get("purpose") != REQUEST:
        return None
    fields = refusal_of_body(body, reason)
    if fields is None:
        return None
    try:
        digest = manifest_digest(signed)
    except RefusedMessage:
        return None
    return fields | {"request_sha256": digest, "expects": key_id(expects)}


def check_unverified(
    body: Mapping[str, Any], request: RoundRequest, signed_sha256: str
) -> tuple[str, str]:
    """Why a site could not verify ``request``, and the id of the coordinator key it holds,
    from its verified ``unverified-request`` notice.

    Raises
    ------
    RefusedMessage
        If the notice names another request, or another manifest than the one the
        coordinator signed (``signed_sha256``): anyone on the API can post a copy of a request
        with a bad signature, and its refusal must not stop the coordinator waiting.
    """
    reason = check_refusal(body, request)
    if body.get("request_sha256") != signed_sha256:
        raise RefusedMessage("a notice about another copy of the request than the one signed")
    return reason, str(body.get("expects"))


def check_refusal(body: Mapping[str, Any], request: RoundRequest) -> str:
    """The reason of a verified refusal that names ``request``.

    Raises
    ------
    RefusedMessage
        If it names another request.
    """
    for name in ("site", "run", "round", "nonce"):
        if body.get(name) != getattr(request, name):
            raise RefusedMessage(f"refusal for another {name}: {body.get(name)!r}")
    reason = body.get("reason")
    return reason if isinstance(reason, str) else "no reason given"


def alive_fields(site: str, at: float, every: float, *, stopped: bool = False) -> dict[str, Any]:
    """The fields of a ``site-alive`` message: ``site``'s process is up at ``at`` (Unix
    seconds) and sends one every ``every`` seconds, or (``stopped``) has just stopped."""
    return {"site": site, "at": float(at), "every": float(every), "stopped": bool(stopped)}


def check_alive(body: Mapping[str, Any], site: str) -> tuple[float, float, bool]:
    """``(at, every, stopped)`` of a verified ``site-alive`` body from ``site``.

    Raises
    ------
    RefusedMessage
        If it is another site's, or a field is missing or of the wrong type.
    """
    if body.get("site") != site:
        raise RefusedMessage(f"sign of life of site {body.get('site')!r}, expected {site!r}")
    at, every, stopped = body.get("at"), body.get("every"), body.get("stopped")
    if not (_is_number(at) and _is_number(every) and every > 0 and isinstance(stopped, bool)):
        raise RefusedMessage("a sign of life needs numbers at and every > 0 and a bool stopped")
    return float(at), float(every), stopped
