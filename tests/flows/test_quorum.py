"""A round keeps the clients that answered and leaves out the ones whose task failed."""

from __future__ import annotations

from prefect import flow, task


@task(retries=0)
def _client(i: int) -> int:
    if i == 2:
        raise RuntimeError("client 2 is down")
    return i * 10


def test_failed_client_tasks_are_left_out_and_logged(prefect_server, caplog):
    from flows.rounds import answered

    @flow
    def one_round() -> list[int]:
        return answered({i: _client.submit(i) for i in range(4)}, "round 1")

    assert one_round() == {0: 0, 1: 10, 3: 30}  # client 2 is left out, the others keep their keys
    assert any("round 1: client-2 failed" in r.getMessage() for r in caplog.records)
