"""Privacy mechanisms: secure aggregation (pairwise masking) and, later, differential privacy."""
