"""Client sampling's stream is its own: the sample of a round is no client's stream of that
round (``client_rng``) drawing the same sample, so sampling and a client's local randomness are
independent."""

import numpy as np

from models.federation.sampling import client_rng, sample_clients


def test_the_sampling_stream_is_none_of_the_clients_streams():
    n, fraction = 100, 0.1
    for seed, round_ in ((0, 1), (7, 3)):
        sample = sample_clients(n, fraction, seed, round_)
        same = [
            c
            for c in range(n)
            if np.array_equal(
                np.sort(client_rng(seed, round_, c).choice(n, size=10, replace=False)), sample
            )
        ]

        assert sample.size == 10 and same == []
