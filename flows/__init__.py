"""Prefect flows: orchestration of the federated rounds (the training flow arrives with issue 3)."""
