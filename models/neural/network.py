"""Mult-DAE and Mult-VAE (Liang et al., WWW 2018): a user's history in, a softmax over items out.

The network is plain numpy: its parameters are a dict of named arrays (float32 in training, any
float dtype works, float64 for gradient checks), and :func:`loss_and_gradients` writes the
backward pass out by hand. The input of a batch is a sparse users x items matrix; the first layer
is a ``scipy.sparse`` product, so its cost grows with the interactions, not the catalogue.

Forward pass for one user with history ``x`` (binary), as in the paper:

    a      = dropout(x / ||x||_2)                           (training only; scaled by 1/keep)
    h      = tanh(... tanh(a W_enc0 + b_enc0) ...)          encoder, tanh hidden layers
    DAE:   z = tanh(h W + b)                                latent code
    VAE:   [mu, logvar] = h W + b;  z = mu + eps * exp(logvar / 2)   (z = mu when scoring)
    logits = tanh(... z W_dec0 + b_dec0 ...) W_last + b_last
    loss   = -sum_i x_i log softmax(logits)_i  + beta * KL(q(z|x) || N(0, I))  + l2 * sum ||W||^2

(the multinomial log-likelihood is the categorical cross-entropy with the history as target; the
first two terms are averaged over the batch's users).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import sparse

Kind = Literal["dae", "vae"]
KINDS: tuple[Kind, ...] = ("dae", "vae")
Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class Architecture:
    """The shape of a Mult-DAE or Mult-VAE.

    Attributes
    ----------
    n_items : int
        Catalogue size: the input and the softmax width.
    kind : {"dae", "vae"}
    hidden : tuple of int
        Encoder hidden widths (the decoder mirrors them): ``(600,)`` with ``latent=200`` is the
        paper's Mult-VAE ``[I -> 600 -> 200 -> 600 -> I]``; ``()`` with ``latent=200`` is its
        Mult-DAE ``[I -> 200 -> I]``.
    latent : int
    """

    n_items: int
    kind: Kind = "vae"
    hidden: tuple[int, ...] = (600,)
    latent: int = 200

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"network kind={self.kind!r} is unknown; allowed: dae, vae")
        widths = (self.n_items, self.latent, *self.hidden)
        if any(int(w) != w or w < 1 for w in widths):
            raise ValueError(
                f"network widths n_items={self.n_items}, hidden={self.hidden}, "
                f"latent={self.latent} must be integers >= 1"
            )

    @property
    def encoder_dims(self) -> list[int]:
        out = self.latent * (2 if self.kind == "vae" else 1)
        return [self.n_items, *self.hidden, out]

    @property
    def decoder_dims(self) -> list[int]:
        return [self.latent, *reversed(self.hidden), self.n_items]

    def layer_names(self) -> list[str]:
        n_enc, n_dec = len(self.encoder_dims) - 1, len(self.decoder_dims) - 1
        return [f"enc{i}" for i in range(n_enc)] + [f"dec{i}" for i in range(n_dec)]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter, in a fixed order (``<layer>_w``, ``<layer>_b``)."""
        out: dict[str, tuple[int, ...]] = {}
        for prefix, dims in (("enc", self.encoder_dims), ("dec", self.decoder_dims)):
            for i, (d_in, d_out) in enumerate(pairwise(dims)):
                out[f"{prefix}{i}_w"] = (d_in, d_out)
                out[f"{prefix}{i}_b"] = (d_out,)
        return out


def init_params(arch: Architecture, rng: np.random.Generator, dtype: type = np.float32) -> Params:
    """Glorot-uniform weights and N(0, 0.001^2) biases, as the paper's code initialises them."""
    params: Params = {}
    for name, shape in arch.shapes().items():
        if name.endswith("_w"):
            limit = np.sqrt(6.0 / (shape[0] + shape[1]))
            params[name] = rng.uniform(-limit, limit, size=shape).astype(dtype)
        else:
            params[name] = (0.001 * rng.standard_normal(shape)).astype(dtype)
    return params


def check_params(params: Params, arch: Architecture) -> None:
    """Raise ValueError naming the first parameter that is missing or has the wrong shape."""
    for name, shape in arch.shapes().items():
        if name not in params:
            raise ValueError(f"network parameter {name!r} is missing; expected shape {shape}")
        if params[name].shape != shape:
            raise ValueError(
                f"network parameter {name!r} has shape {params[name].shape}, expected {shape}"
            )
    extra = sorted(set(params) - set(arch.shapes()))
    if extra:
        raise ValueError(f"network parameters {extra} do not belong to {arch}")


def normalize_rows(history: sparse.spmatrix, dtype: type = np.float32) -> sparse.csr_matrix:
    """Each row divided by its L2 norm (all-zero rows stay zero): the network's input."""
    x = sparse.csr_matrix(history, dtype=dtype, copy=True)
    x.sum_duplicates()
    counts = np.diff(x.indptr)
    rows = np.repeat(np.arange(x.shape[0]), counts)
    norms = np.sqrt(np.bincount(rows, weights=x.data.astype(np.float64) ** 2, minlength=x.shape[0]))
    x.data /= norms[rows].astype(dtype)
    return x


def corrupt(
    history: sparse.csr_matrix, dropout: float, rng: np.random.Generator, dtype: type = np.float32
) -> sparse.csr_matrix:
    """The training input: rows L2-normalised, then each entry dropped with probability
    ``dropout`` and the kept ones scaled by ``1 / (1 - dropout)`` (inverted dropout)."""
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout} must be in [0, 1)")
    x = normalize_rows(history, dtype)
    if dropout > 0:
        keep = rng.random(x.nnz) >= dropout
        x.data *= keep / dtype(1.0 - dropout)
        x.eliminate_zeros()
    return x


@dataclass
class _Trace:
    """What the backward pass needs from the forward pass."""

    inputs: list[np.ndarray | sparse.csr_matrix]  # input of every layer, in layer order
    mu: np.ndarray | None
    logvar: np.ndarray | None
    z: np.ndarray
    logits: np.ndarray


def _forward(
    params: Params, arch: Architecture, inputs: sparse.csr_matrix, noise: np.ndarray | None
) -> _Trace:
    n_enc = len(arch.encoder_dims) - 1
    n_dec = len(arch.decoder_dims) - 1
    layer_inputs: list[np.ndarray | sparse.csr_matrix] = []
    h: np.ndarray | sparse.csr_matrix = inputs
    for i in range(n_enc):
        layer_inputs.append(h)
        h = np.asarray(h @ params[f"enc{i}_w"]) + params[f"enc{i}_b"]
        if i < n_enc - 1 or arch.kind == "dae":
            h = np.tanh(h)
    mu = logvar = None
    if arch.kind == "vae":
        mu, logvar = h[:, : arch.latent], h[:, arch.latent :]
        h = mu if noise is None else mu + noise * np.exp(0.5 * logvar)
    z = h
    for i in range(n_dec):
        layer_inputs.append(h)
        h = h @ params[f"dec{i}_w"] + params[f"dec{i}_b"]
        if i < n_dec - 1:
            h = np.tanh(h)
    return _Trace(layer_inputs, mu, logvar, z, h)


def logits(params: Params, arch: Architecture, history: sparse.spmatrix) -> np.ndarray:
    """Scoring pass: normalised history in, no dropout, ``z = mu``; (n_users, n_items) logits."""
    dtype = params["enc0_w"].dtype.type
    return _forward(params, arch, normalize_rows(history, dtype), None).logits


def log_softmax(values: np.ndarray) -> np.ndarray:
    shifted = values - values.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class Loss:
    """The terms of one batch's objective (per user averages; ``total`` is what is minimised)."""

    nll: float
    kl: float
    l2: float
    total: float


def loss_and_gradients(
    params: Params,
    arch: Architecture,
    inputs: sparse.csr_matrix,
    targets: sparse.csr_matrix,
    *,
    noise: np.ndarray | None,
    beta: float,
    l2: float,
) -> tuple[Loss, Params]:
    """The objective on one batch and its gradient with respect to every parameter.

    Parameters
    ----------
    params : dict of str -> ndarray
    arch : Architecture
    inputs : csr_matrix (batch, n_items)
        The network's input (normalised and dropped out, see :func:`corrupt`).
    targets : csr_matrix (batch, n_items)
        The history the softmax must explain (binary, or interaction counts).
    noise : ndarray (batch, latent) or None
        The VAE's standard normal draw (None: ``z = mu``); ignored by a DAE.
    beta : float
        Weight of the KL term (annealed by the caller); ignored by a DAE.
    l2 : float
        Weight of the squared norm of the weight matrices (biases are not penalised).

    Returns
    -------
    Loss, dict of str -> ndarray
        Gradients have the parameters' names, shapes and dtypes.
    """
    dtype = params["enc0_w"].dtype.type
    batch = inputs.shape[0]
    trace = _forward(params, arch, inputs, noise)
    targets = sparse.csr_matrix(targets, dtype=dtype, copy=True)
    targets.sum_duplicates()  # then (row, item) pairs are unique and fancy indexing is safe
    rows = np.repeat(np.arange(batch), np.diff(targets.indptr))
    # Softmax without a second full-width pass for the log: the likelihood needs the log
    # probabilities at the history's items only. ``trace.logits`` is not needed after this.
    shifted = trace.logits
    shifted -= shifted.max(axis=1, keepdims=True)
    grad = np.exp(shifted)
    total = grad.sum(axis=1, keepdims=True)
    log_total = np.log(total)[:, 0]
    picked = shifted[rows, targets.indices] - log_total[rows]
    nll = -float(np.dot(targets.data, picked)) / batch
    # d nll / d logits = (softmax * n_u - x) / batch
    counts = np.asarray(targets.sum(axis=1), dtype=dtype)
    grad *= counts / (total * dtype(batch))
    grad[rows, targets.indices] -= targets.data / dtype(batch)

    grads: Params = {}
    names = arch.layer_names()
    n_enc = len(arch.encoder_dims) - 1
    for layer in range(len(names) - 1, n_enc - 1, -1):  # decoder, last layer first
        name = names[layer]
        h_in = trace.inputs[layer]
        grads[f"{name}_w"] = h_in.T @ grad
        grads[f"{name}_b"] = grad.sum(axis=0)
        grad = grad @ params[f"{name}_w"].T
        if layer > n_enc:  # h_in is the tanh output of the previous decoder layer
            grad *= 1 - h_in * h_in
    kl = 0.0
    if arch.kind == "vae":
        assert trace.mu is not None and trace.logvar is not None
        mu, logvar = trace.mu, trace.logvar
        var = np.exp(logvar)
        kl = float(0.5 * (-logvar + var + mu * mu - 1).sum()) / batch
        d_mu = grad + dtype(beta / batch) * mu
        d_logvar = dtype(0.5 * beta / batch) * (var - 1)
        if noise is not None:
            d_logvar = d_logvar + grad * noise * (0.5 * np.exp(0.5 * logvar))
        grad = np.concatenate([d_mu, d_logvar], axis=1)
    else:
        grad = grad * (1 - trace.z * trace.z)
    for layer in range(n_enc - 1, -1, -1):
        name = names[layer]
        h_in = trace.inputs[layer]
        if layer == 0:
            grads[f"{name}_w"] = np.asarray(h_in.T @ grad)  # sparse input: X^T G
        else:
            grads[f"{name}_w"] = h_in.T @ grad
        grads[f"{name}_b"] = grad.sum(axis=0)
        if layer > 0:
            grad = grad @ params[f"{name}_w"].T
            grad *= 1 - h_in * h_in
    penalty = 0.0
    if l2 > 0:
        for name in grads:
            if name.endswith("_w"):
                penalty += float(np.vdot(params[name], params[name]))
                grads[name] += dtype(2 * l2) * params[name]
    penalty *= l2
    grads = {name: grads[name].astype(dtype, copy=False) for name in arch.shapes()}
    return Loss(nll, kl, penalty, nll + beta * kl + penalty), grads


# --- persistence ---------------------------------------------------------------------------
def save_network(path: str | Path, params: Params, arch: Architecture) -> None:
    """``.npz`` of the parameters and the architecture, arrays only (no pickles)."""
    check_params(params, arch)
    np.savez(
        path,
        arch_kind=np.array(arch.kind),
        arch_n_items=np.array(arch.n_items, dtype=np.int64),
        arch_hidden=np.array(arch.hidden, dtype=np.int64),
        arch_latent=np.array(arch.latent, dtype=np.int64),
        **{f"param_{name}": value for name, value in params.items()},
    )


def load_network(path: str | Path) -> tuple[Params, Architecture]:
    """Read :func:`save_network`'s file with ``allow_pickle=False``; shapes are checked."""
    with np.load(path, allow_pickle=False) as data:
        if "arch_kind" not in data:
            raise ValueError(f"{path}: not a neural network file (no architecture)")
        arch = Architecture(
            n_items=int(data["arch_n_items"]),
            kind=str(data["arch_kind"]),  # type: ignore[arg-type]
            hidden=tuple(int(h) for h in data["arch_hidden"]),
            latent=int(data["arch_latent"]),
        )
        params = {
            key.removeprefix("param_"): data[key] for key in data.files if key.startswith("param_")
        }
    check_params(params, arch)
    return params, arch
