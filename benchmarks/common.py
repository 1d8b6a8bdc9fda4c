"""Shared plumbing for the benchmark scripts: data discovery, the machine, tables and JSON."""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from models.data.movielens import read_movielens_1m, read_movielens_100k
from models.data.readers import datasets_dir
from models.data.schema import Interactions

RESULTS = Path(__file__).resolve().parent / "results"
READERS = {"ml-100k": read_movielens_100k, "ml-1m": read_movielens_1m}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the module docstring's layout and gives each option's default, unless it
    is None or False (then the help text says what happens) or the help text names it already."""

    def add_argument(self, action: argparse.Action) -> None:
        if action.help is None and self._shows_default(action):  # argparse skips an empty help
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not self._shows_default(action) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS
        return bool(action.option_strings) and not unset and default not in ([], ())


def load_movielens(name: str) -> Interactions | None:
    """The named MovieLens set, or None (with a message) when it is not under FEDREC_DATASETS."""
    folder = datasets_dir() / name
    if not folder.is_dir():
        print(
            f"skipping {name}: not found at {folder} (set FEDREC_DATASETS to the folder holding it)"
        )
        return None
    return READERS[name](folder)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, object]:
    return {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def print_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> None:
    """A plain, aligned text table (markdown-compatible)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
        return "" if value is None else str(value)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)
    ]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for b in body:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) + " |")


def write_json(name: str, payload: dict[str, object]) -> Path:
    """Write ``results/<name>.json`` atomically and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    tmp.replace(path)
    return path
