"""The per-round progress line: elapsed time since the run started and the time left."""

from __future__ import annotations

from flows.rounds import pace


def test_eta_is_the_median_of_the_last_steps_times_the_rounds_left():
    # steps ended at 10, 12, 20, 23 s after a first step that started at 4 s: steps of 6, 2, 8, 3
    # seconds; the last three's median is 3; 6 of 10 rounds left -> 18 s
    marks = [4.0, 10.0, 12.0, 20.0, 23.0]

    line = pace(marks, started=0.0, label="round 4/10")

    assert line == "elapsed 0:23, ETA 0:18 (3.0 s/round)"


def test_a_slower_phase_sets_the_eta_within_two_of_its_steps():
    # five 1.6 s rounds (implicit ALS), then two 8.6 s ones (the re-ranker's): 13 of 20 left
    marks = [0.0, 1.6, 3.2, 4.8, 6.4, 8.0, 16.6, 25.2]

    line = pace(marks, started=0.0, label="round 7/20")

    assert line.endswith("ETA 1:52 (8.6 s/round)"), line  # the whole run's median says 1.6


def test_the_last_round_and_labels_without_a_total_show_elapsed_only():
    marks = [0.0, 3725.0]

    assert pace(marks, 0.0, "round 10/10 (final)") == "elapsed 1:02:05"
    assert pace(marks, 0.0, "warm-up") == "elapsed 1:02:05"
    assert pace([0.0, 5400.0], 0.0, "warm-up") == "elapsed 1:30:00"  # 1800 s past the hour
    assert pace([0.0, 1800.0], 0.0, "warm-up") == "elapsed 30:00"


def test_one_round_left_after_the_first_step_shows_that_steps_time():
    marks = [100.0, 105.0]  # the first step alone, 5 s, in a run that started at 95 s

    assert pace(marks, 95.0, "round 1/2") == "elapsed 0:10, ETA 0:05 (5.0 s/round)"


def test_a_runs_step_lines_keep_its_step_times_until_its_final_step(monkeypatch, caplog):
    """The line of each logged step: its metrics and work, then the run's pace from the times
    its steps were logged at, kept per run until its final step (then dropped: a process that
    runs flows for months keeps no run's times)."""
    import logging
    from types import SimpleNamespace

    import flows.rounds as rounds

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(rounds, "time", SimpleNamespace(time=lambda: clock.now))
    monkeypatch.setattr(rounds, "get_run_logger", lambda: logging.getLogger("fedrec.progress"))
    ctx = SimpleNamespace(run_id="run-a", config=SimpleNamespace(top_k=10))
    metrics = {"valid/rmse": 0.91234, "system/clients": 3.0, "system/bytes_uploaded": 2.5e6,
               "system/round_seconds": 9.5}  # fmt: skip
    # the first step took 10 s and was logged at 110 s; then steps of 10, 40 and 10 s
    lines = []
    with caplog.at_level(logging.INFO, logger="fedrec.progress"):
        for now, label in ((110, "round 1/4"), (120, "round 2/4"), (160, "round 3/4"),
                           (170, "round 4/4 (final)")):  # fmt: skip
            clock.now = float(now)
            rounds.report_step(ctx, label, metrics, seconds=10.0)
            lines.append(caplog.records[-1].getMessage())

    assert lines[0] == (
        "round 1/4: valid/rmse 0.9123, 3 clients, 2.5 MB up, 9.50 s; "
        "elapsed 0:10, ETA 0:30 (10.0 s/round)"
    )
    assert lines[2].endswith("elapsed 1:00, ETA 0:10 (10.0 s/round)")  # median of 10, 10, 40
    assert lines[3].endswith("elapsed 1:10")
    assert "run-a" not in rounds._STEP_MARKS
    clock.now = 500.0  # the same run id again (a resumed run in this process) starts afresh
    with caplog.at_level(logging.INFO, logger="fedrec.progress"):
        rounds.report_step(ctx, "round 2/5", {}, seconds=30.0)
    assert caplog.records[-1].getMessage() == (
        "round 2/5: no evaluation, trained before the run was resumed (its clients and time "
        "went with the process); elapsed 0:30, ETA 1:30 (30.0 s/round)"
    )
    rounds._STEP_MARKS.pop("run-a", None)
