"""Prefect artifacts that summarise a training run in the Prefect UI."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE


def _round_columns(k: int) -> tuple[str, ...]:
    """The per-round table's columns, the ranking metric at the run's K."""
    return ("train/rmse", "valid/rmse", f"valid/ndcg_at_{k}", f"select/ndcg_at_{k}", "valid/client_max/rmse",
            "system/bytes_uploaded", "system/round_seconds")  # fmt: skip


@task(name="publish-summary", cache_policy=NONE)
def publish_summary(
    history: Sequence[Mapping[str, float]], summary: Mapping[str, object], decision_reason: str
) -> None:
    """A table of rounds and a markdown summary (metrics, model version, promotion decision)."""
    columns = _round_columns(int(summary.get("top_k", 10)))  # type: ignore[call-overload]
    rows = [
        {"round": r} | {c: round(float(h[c]), 5) for c in columns if c in h}
        for r, h in enumerate(history, start=1)
    ]
    create_table_artifact(key="fedrec-rounds", table=rows, description="Per-round metrics")
    final = summary.get("metrics", {})
    lines = [
        "# fedrec training run",
        "",
        f"- MLflow run: `{summary.get('run_id')}` ({summary.get('tracking_uri')})",
        f"- model: `{summary.get('model_name')}` version {summary.get('model_version')}",
        f"- promoted to champion: **{summary.get('promoted')}**: {decision_reason}",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in sorted(final.items()) if "client_p10" not in k],  # type: ignore[union-attr]
    ]
    create_markdown_artifact(
        key="fedrec-summary", markdown="\n".join(lines), description="Run summary"
    )
