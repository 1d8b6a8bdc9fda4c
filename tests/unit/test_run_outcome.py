"""A training flow run's final state message: its outcome in one line of at most 500
characters, which is what whoever polls the Prefect API reads."""

from __future__ import annotations

from flows.training import outcome


def _skipped(reason: str) -> dict:
    return {"skipped": True, "reason": reason, "model_name": "m"}


def test_an_outcome_names_the_version_and_the_verdict_with_its_reason():
    summary = {"model_name": "m", "model_version": "3", "promoted": False, "reason": "r"}
    assert outcome(summary) == "model m version 3: not promoted (r)"
    assert outcome(summary | {"promoted": True}) == "model m version 3: promoted to champion (r)"
    assert outcome(_skipped("nothing to train")) == "nothing to train (model m)"


def test_an_outcome_of_500_characters_is_whole_and_a_longer_one_ends_in_an_ellipsis():
    whole = "x" * (500 - len(" (model m)"))
    assert outcome(_skipped(whole)) == f"{whole} (model m)"  # exactly 500
    longer = outcome(_skipped(whole + "y"))  # 501
    assert longer == f"{whole}y (model m)"[:497] + "..." and len(longer) == 500
