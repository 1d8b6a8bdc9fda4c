"""The pure core of fedrec: data, sharding, recommenders, aggregation rules and metrics.

Nothing in this package imports Prefect or MLflow; orchestration lives in ``tasks/`` and ``flows/``.
"""
