"""What a client update says it puts on the wire, counted by hand."""

import numpy as np

from models.protocol import ClientUpdate


def test_an_updates_size_is_its_arrays_bytes_and_8_per_metric():
    update = ClientUpdate(
        3,
        np.arange(5, dtype=np.int64),  # 40 bytes
        np.ones(5, dtype=np.int32),  # 20
        {"gram": np.zeros((5, 6)), "rhs": np.zeros((5, 3), dtype=np.float32)},  # 240 + 60
        {"train_sse": 1.0, "train_n": 2.0, "users": 3.0},  # 3 numbers of 8 bytes
    )
    assert update.nbytes() == 40 + 20 + 240 + 60 + 24
    empty = ClientUpdate(0, np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert empty.nbytes() == 0
