"""Client training task runs are named from their parameters by Prefect itself."""

from __future__ import annotations

import pytest
from prefect._internal.engine import resolve_custom_task_run_name

from models.data.partitions import ClientEntry
from models.federation.loop import EVERYONE_ROUND
from tasks.clients import train_client


def _entry(client_id: int) -> ClientEntry:
    return ClientEntry(client_id, f"clients/client-{client_id:04d}.parquet", 1, 1, 0, 0)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"phase": "train", "round_": 5}, "train client-3 round-5"),
        ({"phase": "train", "round_": 2, "devices": 0.1}, "train cohort-3 round-2"),
        ({"phase": "global-mean", "round_": EVERYONE_ROUND}, "global-mean client-3"),
    ],
)
def test_prefect_names_each_training_run_from_its_parameters(options, expected):
    task = train_client.with_options(retries=2)  # the flow's retrying copy keeps the naming
    parameters = {"entry": _entry(3), "devices": None} | options
    assert resolve_custom_task_run_name(task, parameters) == expected


def test_a_run_whose_parameters_do_not_bind_by_name_keeps_the_task_name():
    assert resolve_custom_task_run_name(train_client, {"kwargs": {}}) == "train-client"
