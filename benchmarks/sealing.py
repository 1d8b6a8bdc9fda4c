"""What sealing a site's answer to the run's coordinator costs (:mod:`models.sites.sealing`):
seconds to seal and to open, and the bytes it adds, for answers of the sizes a site sends.

The default sizes are the ones measured on ML-1M (`benchmarks/wire.py`, explicit ALS, k = 32):
16.8 MB, a site's float64 answer per round with 3 sites; 8.4 MB, the same in float32; 1.04 MB, the
global state a site receives (not sealed; given as a small payload). AES-GCM's speed does not
depend on the bytes, so each payload is random bytes of that size. Medians of ``--repeats``.

    nice -n 10 uv run --frozen python -m benchmarks.sealing [--sizes-mb 16.8 8.4 1.04] [--repeats 9]
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks.common import HelpFormatter, machine, median, print_table, write_json
from models.sites.sealing import new_answer_key, open_answer, seal_answer


def measure(size: int, repeats: int) -> dict[str, float]:
    """Median seconds to seal and to open ``size`` bytes, and the bytes sealing adds."""
    key, data, context = new_answer_key(), os.urandom(size), b"benchmark"
    info = {"seconds": 1.0, "private": 0}
    sealing, opening = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        sealed = seal_answer(data, info, key.public_key(), context)
        sealing.append(time.perf_counter() - started)
        started = time.perf_counter()
        opened, _ = open_answer(sealed, key, context)
        opening.append(time.perf_counter() - started)
        if opened != data:
            raise AssertionError("the sealed answer did not open to its bytes")
    return {
        "MB": size / 1e6,
        "seal_ms": median(sealing) * 1e3,
        "open_ms": median(opening) * 1e3,
        "added_bytes": len(sealed) - size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[16.8, 8.4, 1.04])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--output", default="sealing")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = [measure(int(mb * 1e6), args.repeats) for mb in args.sizes_mb]
    print_table(rows, ["MB", "seal_ms", "open_ms", "added_bytes"])
    path = write_json(args.output, {
        "machine": machine() | {"load_before": load_before, "load_after": os.getloadavg()},
        "args": vars(args), "rows": rows,
    })  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
