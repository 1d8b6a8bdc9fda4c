"""Prefect tasks: thin wrappers, one call into ``models`` or one side effect each, the same for
every model family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def retry_unless(
    *final: type[BaseException] | Callable[[BaseException], bool],
) -> Callable[[Any, Any, Any], bool]:
    """A task's ``retry_condition_fn``: retry a failure unless it raised one of ``final``
    (errors whose answer a retry would not change), given as exception types or as tests of the
    error."""
    kinds = tuple(f for f in final if isinstance(f, type))
    tests = [f for f in final if not isinstance(f, type)]

    def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
        try:
            state.result()
        except BaseException as err:
            return not (isinstance(err, kinds) or any(test(err) for test in tests))
        return True

    return worth_retrying
