"""Cross-device simulation: every user is a client, and one task runs a whole cohort of them.

A Prefect task costs milliseconds, so one task per device cannot scale to thousands of devices per
round. A cohort is a partition holding many users; its task computes each sampled user's update
from that user's rows alone, all at once: the ALS statistics a client sends are sums over its
users, so the cohort's vectorised pass yields exactly the sum of its users' individual updates
(``tests/unit/test_cohorts.py`` checks cohort size 1 against 500). The server only ever sees that
sum, as it would behind secure aggregation of the devices' updates.

Sampling is Poisson, per device: each user takes part in a round when its own coin, seeded by
(seed, round, user id), comes up, so who trains does not depend on how users are grouped into
cohorts, and the DP accountant's Poisson sampling assumption holds exactly.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from models.client import SPLIT, TRAIN, ClientData
from models.data.schema import USER
from models.protocol import ClientUpdate


def sample_devices(user_ids: np.ndarray, fraction: float, seed: int, round_: int) -> np.ndarray:
    """Which of these users (devices) take part in ``round_``: each one's seeded coin."""
    if fraction >= 1.0:
        return np.ones(len(user_ids), dtype=bool)
    key = f"{seed % 10**8:08d}{round_ % 10**8:08d}"  # siphash's 16-character key
    hashes = pd.util.hash_array(np.asarray(user_ids).astype(str).astype(object), hash_key=key)
    return (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def sampled_cohort(
    client: ClientData, fraction: float, seed: int, round_: int
) -> tuple[ClientData, int]:
    """The cohort with only its sampled users' training rows (held-out rows stay, for
    evaluation), and how many sampled users have training rows: the round's clients."""
    chosen = sample_devices(client.user_ids, fraction, seed, round_)
    frame = client.frame
    users = frame[USER].to_numpy()
    training = frame[SPLIT].to_numpy() == TRAIN
    n_clients = int(np.unique(users[training & chosen[users]]).size)
    if chosen.all():
        return client, n_clients
    kept = frame[~training | chosen[users]]
    return replace(client, frame=kept.reset_index(drop=True)), n_clients


def counted(update: ClientUpdate, n_clients: int) -> ClientUpdate:
    """The cohort's summed update, saying how many clients (users) it sums."""
    return replace(update, metrics=update.metrics | {"clients": float(n_clients)})
