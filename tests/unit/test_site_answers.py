"""A site's replay record: kept answers come back bit for bit, also after a restart."""

import os
import stat

import numpy as np
import pytest

from models.sites.answers import SiteRecord
from models.sites.encoding import encode_arrays

KEY = ("run-1", "train", "train", 3, "")


def test_a_retry_gets_the_kept_answer_bit_for_bit(tmp_path):
    record = SiteRecord(tmp_path / "state")
    data = encode_arrays({"x": np.random.default_rng(0).normal(size=5)})
    record.keep(KEY, "ab" * 32, data, {"seconds": 1.5})
    kept = record.kept(KEY)
    assert kept is not None and kept.data == data
    assert kept.state_sha256 == "ab" * 32 and kept.info == {"seconds": 1.5}
    assert record.kept(("run-1", "train", "train", 4, "")) is None


def test_a_restart_reloads_answers_and_nonces(tmp_path):
    record = SiteRecord(tmp_path)
    record.keep(KEY, None, b"answer-bytes")
    record.mark_answered("a" * 32)
    again = SiteRecord(tmp_path)
    assert again.kept(KEY).data == b"answer-bytes"
    assert again.answered("a" * 32) and not again.answered("b" * 32)


def test_kept_files_are_owner_only(tmp_path):
    record = SiteRecord(tmp_path / "s")
    record.keep(KEY, None, b"x")
    for path in (tmp_path / "s", *(tmp_path / "s").rglob("*")):  # the state folder too
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o077 == 0, f"{path} has mode {mode:04o}"


def test_an_answer_altered_on_disk_is_not_sent(tmp_path):
    record = SiteRecord(tmp_path)
    record.keep(KEY, None, b"x")
    (next((tmp_path / "answers").iterdir())).write_bytes(b"y")
    with pytest.raises(ValueError, match="altered on disk"):
        SiteRecord(tmp_path).kept(KEY)


def test_a_corrupt_record_is_refused_with_its_line(tmp_path):
    (tmp_path / "record.jsonl").write_text('{"nonce": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        SiteRecord(tmp_path)
