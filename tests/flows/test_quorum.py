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
    said = [r.getMessage() for r in caplog.records]
    assert "round 1: client-2 failed: RuntimeError: client 2 is down" in said, said


@task(retries=0)
def _timed_out(i: int) -> int:
    raise TimeoutError(f"shop-{i}: no answer within 5 s")


def test_a_failure_is_said_in_its_exceptions_words_not_prefects_wrapping(prefect_server):
    """Prefect's message for a TimeoutError reads "Task run failed due to timeout:
    TimeoutError('...')", which the run's end quoted as a site's reason."""
    from flows.rounds import answered

    failed: dict[int, str] = {}

    @flow
    def one_round() -> dict[int, int]:
        return answered({0: _timed_out.submit(0)}, "enrolment", failed=failed)

    assert one_round() == {}
    assert failed == {0: "TimeoutError: shop-0: no answer within 5 s"}


def test_a_real_site_is_named_in_the_warning_and_in_the_quorums_one_line(prefect_server, caplog):
    import pytest

    from fedrec.config import TrainingConfig
    from flows.rounds import QuorumError, answered, require_quorum

    names = {2: "shop-c"}
    failed: dict[int, str] = {}

    @flow
    def one_round() -> dict[int, int]:
        return answered(
            {i: _client.submit(i) for i in range(3)}, "round 1", failed=failed, names=names
        )

    answers = one_round()
    assert any("round 1: shop-c failed" in r.getMessage() for r in caplog.records)
    assert not any("client-2" in r.getMessage() for r in caplog.records)
    config = TrainingConfig(min_clients=3)
    # one client failed: nothing more to count after its reason
    with pytest.raises(
        QuorumError, match=r"2 of 3 clients answered.*; shop-c: .*client 2 is down$"
    ):
        require_quorum(len(answers), 3, config, "round 1", failed, names)


@task(retries=0)
def _unsafe_client(i: int) -> int:
    from models.files import UnsafeFile

    if i == 1:
        raise UnsafeFile("/w/client-0001.answer.npz: the private file is reached through /w, ...")
    return i


def test_a_private_file_others_could_swap_ends_the_run_instead_of_leaving_a_client_out(
    prefect_server,
):
    """Every simulated client keeps its files in one workspace: one refusal is every client's,
    and the user's to fix (exit 2), not a dropout the round goes on without."""
    import pytest

    from flows.rounds import answered
    from models.files import UnsafeFile

    @flow
    def one_round() -> dict[int, int]:
        return answered({i: _unsafe_client.submit(i) for i in range(3)}, "round 1")

    with pytest.raises(UnsafeFile, match=r"client-0001\.answer\.npz: the private file"):
        one_round()


def test_a_round_that_meets_its_quorum_exactly_asks_no_one_again(prefect_server, caplog):
    """Three of four clients answer and the quorum is three: the round goes on at once, the
    failed client is not asked again; with the quorum at four it is asked again, up to
    round_retries times, before the round gives up."""
    import pytest

    from fedrec.config import TrainingConfig
    from flows.rounds import QuorumError, gather_round

    asked: list[tuple[int, int]] = []

    def submit(i: int, attempt: int):
        asked.append((i, attempt))
        return _client.submit(i)

    @flow
    def one_round(min_clients: int) -> dict[int, int]:
        config = TrainingConfig(min_clients=min_clients, round_retries=2)
        return gather_round(submit, range(4), lambda _: True, config, "round 1")

    assert one_round(3) == {0: 0, 1: 10, 3: 30}
    assert sorted(asked) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert not any("asking" in r.getMessage() for r in caplog.records)

    asked.clear()
    with pytest.raises(QuorumError, match="round 1: 3 of 4 clients answered, the quorum is 4"):
        one_round(4)
    assert sorted(asked) == [(0, 0), (1, 0), (2, 0), (2, 1), (2, 2), (3, 0)]


@task(retries=0)
def _down_at_first(i: int, attempt: int) -> int:
    if i == 3 or (i == 1 and attempt == 0):
        raise RuntimeError(f"client {i} is down")
    return i


def test_the_steps_a_named_site_missed_are_kept_not_those_it_answered_when_asked_again(
    prefect_server,
):
    """Site shop-b fails its first ask and answers the second; shop-d never answers, and
    client 0 has no name (a simulated client): only shop-d missed the round."""
    from fedrec.config import TrainingConfig
    from flows.rounds import answered, gather_round

    names = {1: "shop-b", 2: "shop-c", 3: "shop-d"}
    missed: dict[str, list[str]] = {}

    def submit(key: tuple[str, int], attempt: int):
        return _down_at_first.submit(key[1], attempt)

    @flow
    def one_round() -> dict:
        config = TrainingConfig(min_clients=3, round_retries=1)
        keys = [("train", i) for i in range(4)]
        answers = gather_round(submit, keys, lambda _: True, config, "round 2", None, names, missed)
        answered({3: _down_at_first.submit(3, 0)}, "round-5 evaluation", names=names, missed=missed)
        return answers

    assert sorted(one_round()) == [("train", 0), ("train", 1), ("train", 2)]
    assert missed == {
        "shop-d": ["round 2 train (RuntimeError: client 3 is down)",
                   "round-5 evaluation (RuntimeError: client 3 is down)"]
    }  # fmt: skip


def test_a_quorum_failure_names_the_clients_that_never_answered_not_one_that_did_when_asked_again(
    prefect_server,
):
    import pytest

    from fedrec.config import TrainingConfig
    from flows.rounds import QuorumError, gather_round

    @flow
    def one_round() -> dict:
        config = TrainingConfig(min_clients=4, round_retries=1)
        submit = lambda i, attempt: _down_at_first.submit(i, attempt)  # noqa: E731
        return gather_round(submit, range(4), lambda _: True, config, "round 2")

    with pytest.raises(QuorumError) as raised:
        one_round()
    said = str(raised.value)
    assert "3 of 4 clients answered" in said and "client 3 is down" in said, said
    assert "client 1 is down" not in said, said  # it answered the second ask
