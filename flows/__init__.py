"""Prefect flows: orchestration of the federated rounds (one round loop for every family)."""
