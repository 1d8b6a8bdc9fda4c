"""Every model family's servable recommender, found by the kind its saved state names.

Serving and tracking know recommenders only through what each class declares (``kind``,
``request_columns``, ``requirements``) and the methods every one has (``recommend``, ``save``,
``load``), so a new family's model needs no branch there.
"""

from __future__ import annotations

import json
from pathlib import Path

from models.federation.family import Recommender
from models.mf.recommender import MFRecommender
from models.neural.recommender import NeuralRecommender
from models.ranking.recommender import RankingRecommender

RECOMMENDERS: dict[str, type] = {
    cls.kind: cls for cls in (MFRecommender, RankingRecommender, NeuralRecommender)
}
STATE = "recommender.json"


def read_recommender(folder: str | Path) -> Recommender:
    """A recommender from its saved state files (npz, Parquet, JSON, LightGBM text), read by the
    installed classes: nothing in the folder is executed or unpickled.

    Raises
    ------
    ValueError
        If the folder holds no fedrec recommender, or one of a kind this version does not know.
    """
    folder = Path(folder)
    if not (folder / STATE).is_file():
        raise ValueError(f"{folder}: not a fedrec recommender (no {STATE})")
    kind = json.loads((folder / STATE).read_text()).get("kind")
    if kind is None:  # states saved before the kind was recorded: MF models
        kind = MFRecommender.kind
    if kind not in RECOMMENDERS:
        raise ValueError(
            f"{folder}: recommender kind {kind!r} is unknown to this fedrec; "
            f"allowed: {', '.join(RECOMMENDERS)}"
        )
    return RECOMMENDERS[kind].load(folder)
