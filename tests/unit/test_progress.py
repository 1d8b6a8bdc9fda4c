"""The per-round progress line: elapsed time since the run started and the time left."""

from __future__ import annotations

from flows.rounds import pace


def test_eta_is_the_median_step_times_the_rounds_left():
    # steps ended at 10, 12, 20, 23 s after a first step that started at 4 s: steps of 6, 2, 8, 3
    # seconds, median 4.5; 6 of 10 rounds left -> 27 s
    marks = [4.0, 10.0, 12.0, 20.0, 23.0]

    line = pace(marks, started=0.0, label="round 4/10")

    assert line == "elapsed 0:23, ETA 0:27 (4.5 s/round)"


def test_the_last_round_and_labels_without_a_total_show_elapsed_only():
    marks = [0.0, 3725.0]

    assert pace(marks, 0.0, "round 10/10 (final)") == "elapsed 1:02:05"
    assert pace(marks, 0.0, "warm-up") == "elapsed 1:02:05"
