"""Top-of-the-list recommendation: item-kNN retrieval, candidate features, a federated LightGBM
listwise re-ranker (XE-NDCG or LambdaRank), and the servable two-stage recommender."""
