"""``fedrec keygen``, ``fedrec site run`` and ``fedrec site prune`` as a site's operator types
them: what the flags become (a site's privacy budget and whether it answers exact runs are
defaults here), what is refused in one line, and what prune says it removed."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedrec.cli import main


def _invoke(args: list[str]):
    return CliRunner().invoke(main, args)


def _one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"fedrec: error: {message}"


def test_keygen_writes_a_private_key_once_and_its_public_half(tmp_path):
    from models.privacy.identity import load_identity
    from models.sites.messages import key_id

    out = tmp_path / "keys"

    done = _invoke(["keygen", "--name", "shop-2", "--out", str(out)])

    assert done.exit_code == 0, done.output
    key = load_identity(out / "shop-2.key")
    assert done.output.splitlines() == [
        f"{out / 'shop-2.key'} (private, 0600)",
        f"{out / 'shop-2.pub'} (public, key id {key_id(key)})",
    ]
    assert stat.S_IMODE((out / "shop-2.key").stat().st_mode) == 0o600
    assert b"BEGIN PUBLIC KEY" in (out / "shop-2.pub").read_bytes()
    before = (out / "shop-2.key").read_bytes()
    again = _invoke(["keygen", "--name", "shop-2", "--out", str(out)])
    _one_line_error(again, f"{out / 'shop-2.key'} exists: an identity is generated once")
    assert (out / "shop-2.key").read_bytes() == before


@pytest.mark.parametrize("name", ["Shop", "-shop", "shop_2", "a" * 41, ""])
def test_keygen_refuses_a_name_a_site_cannot_have(tmp_path, name):
    done = _invoke(["keygen", "--name", name, "--out", str(tmp_path)])

    _one_line_error(done, f"--name {name!r} must match [a-z0-9][a-z0-9-]{{0,39}}")
    assert list(tmp_path.iterdir()) == []


def _site_args(tmp_path: Path, name: str = "shop") -> list[str]:
    key = tmp_path / "site.key"
    key.write_text("read by the site's process, not by the command line")
    return ["site", "run", "--name", name, "--data", str(tmp_path / "rows.csv"),
            "--prefect-api", "http://127.0.0.1:9/api", "--mlflow", "http://127.0.0.1:9",
            "--identity", str(key), "--coordinator-key", "coordinator.pub",
            "--state-dir", str(tmp_path / "state")]  # fmt: skip


@pytest.fixture
def started(monkeypatch):
    """The options each ``site run`` would start its process with, in place of starting it."""
    import fedrec.sites.process as process

    options = []
    monkeypatch.setattr(process, "run_site", options.append)
    return options


def test_a_site_run_without_optional_flags_keeps_the_private_defaults(tmp_path, started):
    done = _invoke(_site_args(tmp_path))

    assert done.exit_code == 0, done.output
    (options,) = started
    assert (options.name, options.data, options.prefect_api, options.mlflow) == (
        "shop", str(tmp_path / "rows.csv"), "http://127.0.0.1:9/api", "http://127.0.0.1:9"
    )  # fmt: skip
    assert options.identity == tmp_path / "site.key"
    assert options.coordinator_key == "coordinator.pub"
    assert options.state_dir == tmp_path / "state"
    assert (options.poll_seconds, options.events) == (2.0, True)
    # each user's budget over every run, delta from the site's public default, no exact answers
    assert (options.max_epsilon, options.max_delta, options.allow_exact) == (10.0, None, False)
    assert options.peers is None
    assert options.read_options == {
        "user_col": "user_id", "item_col": "item_id", "rating_col": "rating",
        "timestamp_col": "timestamp", "rating_scale": (1.0, 5.0),
    }  # fmt: skip


def test_every_site_run_flag_reaches_the_site_process(tmp_path, started):
    peers = tmp_path / "sites.yaml"
    flags = ["--poll", "0.05", "--no-events", "--max-epsilon", "2.5", "--max-delta", "1e-7",
             "--peers", str(peers), "--allow-exact", "--user-col", "u", "--item-col", "i",
             "--rating-col", "r", "--timestamp-col", "t", "--rating-scale", "0.5,10"]  # fmt: skip

    done = _invoke([*_site_args(tmp_path), *flags])

    assert done.exit_code == 0, done.output
    (options,) = started
    assert (options.poll_seconds, options.events) == (0.05, False)
    assert (options.max_epsilon, options.max_delta, options.allow_exact) == (2.5, 1e-7, True)
    assert options.peers == str(peers)
    assert options.read_options == {
        "user_col": "u", "item_col": "i", "rating_col": "r", "timestamp_col": "t",
        "rating_scale": (0.5, 10.0),
    }  # fmt: skip
    scale_from_data = _invoke([*_site_args(tmp_path), "--rating-scale", "data"])
    assert scale_from_data.exit_code == 0, scale_from_data.output
    assert started[1].read_options["rating_scale"] is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--poll", "0.04"], "0.04 is not in the range x>=0.05"),
        (["--max-epsilon", "0"], "0.0 is not in the range x>0"),
        (["--max-delta", "1"], "1.0 is not in the range 0<x<1"),
        (["--max-delta", "0"], "0.0 is not in the range 0<x<1"),
    ],
)
def test_a_site_run_refuses_a_setting_out_of_its_range(tmp_path, started, flags, message):
    done = _invoke([*_site_args(tmp_path), *flags])

    assert done.exit_code == 2 and message in done.stderr, done.output
    assert started == []


def test_a_site_run_refuses_a_bad_name_or_a_missing_key_before_it_starts(tmp_path, started):
    bad_name = _invoke(_site_args(tmp_path, name="Shop"))
    args = _site_args(tmp_path)
    (tmp_path / "site.key").unlink()
    no_key = _invoke(args)

    _one_line_error(bad_name, "--name 'Shop' must match [a-z0-9][a-z0-9-]{0,39}")
    _one_line_error(no_key, f"--identity {tmp_path / 'site.key'}: no such key file")
    assert started == []


def _kept_answers(state: Path, ages_in_days: list[float]) -> list[Path]:
    """One kept answer per age, each of its own run, 1 MB each; returns their files, oldest
    first."""
    from models.sites.answers import ANSWERS, SiteRecord

    record = SiteRecord(state / "record")
    for n, _ in enumerate(ages_in_days):
        record.keep((f"run-{n}", "train", "train", 1, ""), None, bytes([n]) * 1_000_000)
    files = sorted((state / "record" / ANSWERS).iterdir(), key=lambda p: p.read_bytes()[:1])
    now = time.time()
    for path, age in zip(files, ages_in_days, strict=True):
        os.utime(path, (now - age * 86400,) * 2)
    return files


def test_site_prune_counts_in_days_and_says_how_many_it_removed(tmp_path):
    state = tmp_path / "state"
    files = _kept_answers(state, [0.75, 0.6, 0.25])
    folder = state / "record"
    prune = ["site", "prune", "--state-dir", str(state), "--older-than", "0.5"]

    dry = _invoke([*prune, "--dry-run"])
    done = _invoke(prune)
    nothing = _invoke(prune)

    assert (dry.exit_code, dry.output.strip()) == (
        0, f"would remove 2 kept answers of 2 runs (2.0 MB), older than 0.5 days, from {folder}"
    )  # fmt: skip
    assert (done.exit_code, done.output.strip()) == (
        0, f"removed 2 kept answers of 2 runs (2.0 MB), older than 0.5 days, from {folder}; "
           "asked again, they are refused"
    )  # fmt: skip
    assert [f.exists() for f in files] == [False, False, True]
    assert (nothing.exit_code, nothing.output.strip()) == (
        0, f"removed 0 kept answers of 0 runs (0.0 MB), older than 0.5 days, from {folder}"
    )  # fmt: skip


def test_site_prune_cuts_at_whole_days_to_the_second(tmp_path):
    state = tmp_path / "state"
    seconds = 1 / 86400
    files = _kept_answers(state, [10 + 6 * seconds, 10 - 6 * seconds])

    done = _invoke(["site", "prune", "--state-dir", str(state), "--older-than", "10"])

    assert done.exit_code == 0, done.output
    assert [f.exists() for f in files] == [False, True]
