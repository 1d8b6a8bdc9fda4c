"""Which explicit model a run builds for the data's rating scale: the scale the served model
clips to, and the relevance threshold of the ranking metrics when the data's top is below it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from prefect import flow

from fedrec.config import TrainingConfig
from flows.families import build_family
from flows.rounds import RunContext
from models.data.partitions import ITEMS, Manifest


@flow
def _built(config: TrainingConfig, data_scale: tuple[float, float], workspace: str) -> Any:
    pd.DataFrame({"item_id": ["a", "b", "c"]}).to_parquet(f"{workspace}/{ITEMS}")  # no features
    manifest = Manifest("f", "test", 3, 3, data_scale, [])
    ctx = RunContext(config, "sqlite://", "run", workspace, manifest, np.arange(3), None)
    return build_family(ctx, None).config


@pytest.mark.parametrize(
    ("fields", "data_scale", "clip_to", "threshold"),
    [
        # the scale taken from the data ("data"): a top below the default threshold 4 moves it
        # three quarters of the way up the scale
        ({"rating_scale": None}, (0.5, 2.5), (0.5, 2.5), 2.0),
        # a top equal to the threshold keeps it: only the top ratings are relevant
        ({"rating_scale": None}, (1.0, 4.0), (1.0, 4.0), 4.0),
        # no threshold asked for: none is made up
        ({"rating_scale": None, "relevance_threshold": None}, (0.5, 2.5), (0.5, 2.5), None),
        # a scale given by the user is the one served, whatever the reader says (MovieLens's
        # reader says 1..5)
        ({"rating_scale": (0.5, 5.0)}, (1.0, 5.0), (0.5, 5.0), 4.0),
    ],
    ids=["data-top-below", "data-top-at", "data-no-threshold", "given"],
)
def test_an_explicit_run_clips_to_its_scale_and_counts_relevance_within_it(
    prefect_server, tmp_path, fields, data_scale, clip_to, threshold
):
    config = TrainingConfig(**fields)
    built = _built(config, data_scale, str(tmp_path))
    assert built.clip_to == clip_to
    assert built.relevance_threshold == threshold
