"""Matrix factorization r_ui = mu + b_u + b_i + p_u . q_i, trained centrally or federated."""
