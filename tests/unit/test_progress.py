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


def test_one_round_left_after_the_first_step_shows_that_steps_time():
    marks = [100.0, 105.0]  # the first step alone, 5 s, in a run that started at 95 s

    assert pace(marks, 95.0, "round 1/2") == "elapsed 0:10, ETA 0:05 (5.0 s/round)"
