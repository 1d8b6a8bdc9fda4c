"""Top-of-the-list recommendation: item-kNN retrieval, candidate features, a federated LightGBM
LambdaRank re-ranker, and the servable two-stage recommender."""
