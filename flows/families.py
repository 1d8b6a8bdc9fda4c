"""Which model family a run trains, built from its configuration and privacy plan."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
from prefect import get_run_logger

from fedrec.config import scaled_threshold
from flows.rounds import Privacy, RunContext
from models.data.partitions import read_item_features
from models.federation.family import Family
from models.mf.family import ExplicitMF
from models.neural.family import Neural
from models.privacy.dp import UserLevelDP
from models.ranking.family import TwoStage


def build_family(ctx: RunContext, plan: Privacy | None) -> Family:
    """The configured family: explicit MF, the two-stage ranking model or the neural model; with
    DP's bounds and noise when ``plan`` is given."""
    config, logger = ctx.config, get_run_logger()
    titles, features = _catalogue(ctx)
    if config.feedback == "explicit":
        mf = config.mf_config()
        if mf.clip_to is None and ctx.manifest.rating_scale is not None:  # --rating-scale data
            low, high = ctx.manifest.rating_scale
            mf = replace(mf, clip_to=(low, high))  # the served model predicts on that scale
            if mf.relevance_threshold is not None and mf.relevance_threshold > high:
                mf = replace(mf, relevance_threshold=scaled_threshold(low, high))
                logger.info("ranking metrics count held-out ratings >= %g as relevant (the "
                            "data's scale tops at %g)", mf.relevance_threshold, high)  # fmt: skip
        if plan is not None:
            dp = UserLevelDP(plan.noise_multiplier, config.dp_max_items, shares=plan.shares)
            logger.info("DP sensitivity of one user's ALS statistics: %.2f", dp.sensitivity)
            mf = replace(mf, dp=dp)
        released = None if plan is None else plan.release  # the final evaluation's bounds
        return ExplicitMF(mf, ctx.item_ids, titles, released=released)
    if config.implicit_model == "neural":
        return Neural(
            config.neural_config(), ctx.item_ids, titles,
            positive_threshold=config.positive_threshold,
        )  # fmt: skip
    rc = config.ranking_config()
    if plan is not None:  # implicit ALS alone: kNN and the re-ranker have no DP mechanism
        dp = UserLevelDP.for_implicit(plan.noise_multiplier, config.dp_max_items, plan.shares)
        logger.info("DP sensitivity of one user's implicit-ALS statistics: %.2f",
                    dp.implicit_sensitivity(rc.alpha))  # fmt: skip
        rc = replace(rc, dp=dp)
    return TwoStage(rc, ctx.item_ids, titles, features)


def _catalogue(ctx: RunContext) -> tuple[np.ndarray | None, pd.DataFrame | None]:
    """The public item catalogue of the run: titles, and features by item index."""
    catalogue = read_item_features(ctx.workspace)
    if catalogue is None:
        return None, None
    titles = catalogue["title"].to_numpy(dtype=object) if "title" in catalogue else None
    features = catalogue.drop(columns=["title"], errors="ignore")
    return titles, (features if features.shape[1] else None)
