"""Seconds per epoch of the same Mult-VAE in PyTorch: the other side of the implementation choice.

PyTorch is not a dependency of fedrec (the locked environment would pull a CUDA build of several
GB). Run this in an environment that has it, next to the numpy figure of
``python -m benchmarks.neural --epoch-timing``:

    python -m venv /tmp/torch && /tmp/torch/bin/pip install torch==2.13.0 numpy scipy pandas pyarrow scikit-learn
    /tmp/torch/bin/python -m benchmarks.neural_torch --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import sparse

from benchmarks.common import HelpFormatter, load_movielens
from models.data.schema import ITEM, USER, keep_positives


def main() -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = keep_positives(load_movielens("ml-1m"), 3.0)
    frame = data.frame
    matrix = sparse.csr_matrix(
        (np.ones(len(frame), np.float32), (frame[USER].to_numpy(), frame[ITEM].to_numpy())),
        shape=(data.n_users, data.n_items),
    )
    n_users, n_items = matrix.shape

    class MultVAE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc0, self.enc1 = nn.Linear(n_items, 600), nn.Linear(600, 400)
            self.dec0, self.dec1 = nn.Linear(200, 600), nn.Linear(600, n_items)

        def forward(self, x):
            h = F.dropout(F.normalize(x), 0.5, self.training)
            h = self.enc1(torch.tanh(self.enc0(h)))
            mu, logvar = h[:, :200], h[:, 200:]
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            return self.dec1(torch.tanh(self.dec0(z))), mu, logvar

    model = MultVAE()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    rng = np.random.default_rng(0)

    def epoch() -> None:
        order = rng.permutation(n_users)
        for lo in range(0, n_users, 500):
            x = torch.from_numpy(matrix[order[lo : lo + 500]].toarray())
            logits, mu, logvar = model(x)
            nll = -(F.log_softmax(logits, 1) * x).sum(1).mean()
            kl = 0.5 * (-logvar + logvar.exp() + mu**2 - 1).sum(1).mean()
            optimizer.zero_grad()
            (nll + 0.2 * kl).backward()
            optimizer.step()

    epoch()  # warm-up
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - started)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s): one Mult-VAE epoch on ML-1M "
        f"{np.median(times):.2f} s (median of {[round(t, 2) for t in times]})"
    )


if __name__ == "__main__":
    main()
