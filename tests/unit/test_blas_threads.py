"""fedrec.runtime.one_blas_thread: BLAS runs one thread per calling thread inside the block, as
threadpoolctl reads it back from the loaded libraries, and a thread count the user set wins."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.runtime import _THREAD_ENV, one_blas_thread

threadpoolctl = pytest.importorskip("threadpoolctl")


def _blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


@pytest.fixture
def two_blas_threads(monkeypatch):
    for name in _THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    np.ones((2, 2)) @ np.ones((2, 2))  # BLAS loaded
    if not _blas_threads():
        pytest.skip("numpy has no BLAS library that threadpoolctl can see")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        yield


def test_the_block_runs_with_one_blas_thread_and_the_count_comes_back(two_blas_threads):
    before = _blas_threads()

    with one_blas_thread():
        inside = _blas_threads()
        product = np.arange(6.0).reshape(2, 3) @ np.arange(6.0).reshape(3, 2)

    assert set(inside) == {1}
    assert _blas_threads() == before and set(before) == {2}
    np.testing.assert_array_equal(product, [[10.0, 13.0], [28.0, 40.0]])


def test_a_thread_count_set_by_the_user_wins(two_blas_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")

    with one_blas_thread():
        inside = _blas_threads()

    assert set(inside) == {2}
