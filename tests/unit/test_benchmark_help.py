"""Every benchmark's --help gives each option's default: the README's commands are read against
it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from benchmarks.common import HelpFormatter

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="One line.\n\n    kept as written", formatter_class=HelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N")
    parser.add_argument("--out", default=None, help="results file (default: bench_<data>)")
    parser.add_argument("--only", action="append", default=[], help="repeatable")
    parser.add_argument("--quiet", action="store_true", help="print less")
    parser.add_argument("--scale", type=float, default=0.5, help="share of the data")
    return parser


def test_each_option_gives_its_default_once_and_the_description_keeps_its_layout():
    raw = _parser().format_help()
    text = " ".join(raw.split())
    assert "\n    kept as written\n" in raw
    assert "--rounds ROUNDS (default: 10)" in text  # an option without help text
    assert "leave out the first N (default: 0)" in text  # a zero is a default, not "unset"
    assert "results file (default: bench_<data>) --only" in text  # the help says it: not twice
    assert "repeatable --quiet print less --scale" in text  # [] and False: nothing to show
    assert "share of the data (default: 0.5)" in text


def test_every_benchmark_parser_uses_it():
    parsers = 0
    for path in sorted(BENCHMARKS.glob("*.py")):
        for call in re.finditer(r"argparse\.ArgumentParser\((.*?)\)\n", path.read_text(), re.S):
            assert "formatter_class=HelpFormatter" in call.group(1), path.name
            parsers += 1
    assert parsers >= 15
