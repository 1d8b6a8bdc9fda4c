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


def test_old_answers_are_pruned_and_their_exchanges_refused_also_after_a_restart(tmp_path):
    """Only answers older than the cut are removed; a pruned exchange asked again is refused
    (by the running process and by a restarted one), never taken for one never answered."""
    from models.sites.answers import ANSWERS, AnswerPruned, prune_answers

    record = SiteRecord(tmp_path)
    old, new = ("run-0", "train", "train", 1, ""), ("run-1", "train", "train", 1, "")
    record.keep(old, None, b"o" * 1000)
    record.keep(KEY, None, b"k" * 500)
    record.keep(new, None, b"new")
    record.mark_answered("a" * 32)
    files = {key: next(p for p in (tmp_path / ANSWERS).iterdir() if p.read_bytes()[:1] == b)
             for key, b in ((old, b"o"), (KEY, b"k"), (new, b"n"))}  # fmt: skip
    day = 86400.0
    for key, age in ((old, 30), (KEY, 8), (new, 1)):
        os.utime(files[key], (files[key].stat().st_mtime - age * day,) * 2)

    would = prune_answers(tmp_path, 7 * day, dry_run=True)
    assert (would.answers, would.nbytes, would.runs) == (2, 1500, {"run-0", "run-1"})
    assert all(path.exists() for path in files.values())  # a dry run removes nothing
    done = prune_answers(tmp_path, 7 * day)
    assert (done.answers, done.nbytes) == (2, 1500)
    assert not files[old].exists() and not files[KEY].exists() and files[new].exists()
    for reader in (record, SiteRecord(tmp_path)):  # the process that ran, and a restarted one
        with pytest.raises(AnswerPruned, match=r"train round 3 of run run-1 was answered "):
            reader.kept(KEY)
        assert reader.kept(new).data == b"new"
        assert reader.answered("a" * 32)  # a replayed request is still told apart
    assert prune_answers(tmp_path, 7 * day).answers == 0  # nothing twice


def test_an_answer_file_removed_by_hand_is_refused_not_answered_again(tmp_path):
    from models.sites.answers import ANSWERS, AnswerPruned

    record = SiteRecord(tmp_path)
    record.keep(KEY, None, b"answer")
    for path in (tmp_path / ANSWERS).iterdir():
        path.unlink()
    with pytest.raises(AnswerPruned):
        record.kept(KEY)


def test_a_prune_cut_short_after_its_line_is_finished_by_the_next(tmp_path):
    """The line that says an answer was pruned is written before its file is removed: a crash
    in between leaves the file, refused all the same, and the next prune removes it."""
    from models.sites.answers import ANSWERS, AnswerPruned, prune_answers

    record = SiteRecord(tmp_path)
    record.keep(KEY, None, b"answer")
    (path,) = (tmp_path / ANSWERS).iterdir()
    record._append({"pruned": path.stem})  # the crash: the line is there, the file too
    with pytest.raises(AnswerPruned):
        SiteRecord(tmp_path).kept(KEY)
    assert prune_answers(tmp_path, 7 * 86400.0).answers == 1  # however new the file
    assert not path.exists()
    assert (tmp_path / "record.jsonl").read_text().count("pruned") == 1  # no second line


def test_an_answer_exactly_as_old_as_the_cut_is_kept(tmp_path):
    """ "Older than" is strict: a file whose age is the cut to the second stays."""
    from models.sites.answers import ANSWERS, prune_answers

    SiteRecord(tmp_path).keep(KEY, None, b"k" * 10)
    (path,) = (tmp_path / ANSWERS).iterdir()
    os.utime(path, (1_000_000.0, 1_000_000.0))

    assert prune_answers(tmp_path, 10.0, dry_run=True, now=1_000_010.0).answers == 0
    assert prune_answers(tmp_path, 10.0, dry_run=True, now=1_000_010.5).answers == 1


def test_a_pruned_answer_of_round_0_is_named_round_0(tmp_path):
    from models.sites.answers import AnswerPruned, prune_answers

    record = SiteRecord(tmp_path)
    mean = ("run-1", "train", "mean", 0, "")
    record.keep(mean, None, b"m")
    assert prune_answers(tmp_path, 0.0, now=1e12).answers == 1

    with pytest.raises(AnswerPruned, match=r"^train mean round 0 of run run-1 was answered"):
        record.kept(mean)
