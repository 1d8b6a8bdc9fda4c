"""The promotion lock file is never followed through a symlink nor truncated."""

from __future__ import annotations

import pytest

from tasks.tracking import promotion_lock


def test_a_symlink_at_the_lock_path_is_refused_and_its_target_untouched(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (store / ".fedrec-promotion.lock").symlink_to(target)

    refused = pytest.raises(RuntimeError, match="promotion lock is a symbolic link; refused")
    with refused, promotion_lock(f"sqlite:///{store / 'mlflow.db'}"):
        pass

    assert target.read_text() == "keep me"


def test_the_lock_file_is_private_and_not_truncated(tmp_path):
    lock = tmp_path / ".fedrec-promotion.lock"

    with promotion_lock(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        assert lock.exists()
    lock.write_text("left by someone")
    with promotion_lock(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        pass

    assert lock.read_text() == "left by someone"
    assert lock.stat().st_mode & 0o777 == 0o600
