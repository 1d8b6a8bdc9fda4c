"""Every numeric setting of a run at the edges of what it allows: the last value accepted and the
first refused, with a message naming the setting. The table writes each range out (one round, one
tree, one client, no retries...) instead of reading it from the configuration, so that a bound
moved by one in either direction fails."""

import pydantic
import pytest

from fedrec.config import TrainingConfig

# setting: (values at the edge that are allowed, values just past it that are refused)
EDGES = {
    "seed": ([0], [-1]),
    "synthetic_seed": ([0], [-1]),
    "synthetic_users": ([2], [1]),
    "synthetic_items": ([2], [1]),
    "synthetic_interactions": ([10], [9]),
    "synthetic_taste": ([1e-6], [0.0]),
    "clients": ([1], [0]),
    "cohort_size": ([1], [0]),
    "dirichlet_alpha": ([1e-6], [0.0]),
    "key_prefix": ([1], [0]),
    "valid_fraction": ([0.89], [-0.01, 1.0]),  # 0 only with a valid file or another metric
    "test_fraction": ([0.0, 0.89], [-0.01, 1.0]),
    "factors": ([1], [0]),
    "reg": ([1e-9], [0.0]),
    "alpha": ([1e-9], [0.0]),
    "neighbours": ([1], [0]),
    "candidates": ([1], [0]),
    "neural_latent": ([1], [0]),
    "neural_hidden": ([0], [-1]),
    "neural_lr": ([1e-9], [0.0]),
    "neural_batch_size": ([1], [0]),
    "neural_local_epochs": ([1], [0]),
    "ranker_rounds": ([1], [0]),
    "ranker_trees": ([1], [0]),
    "ranker_learning_rate": ([1e-9, 1.0], [0.0, 1.01]),
    "ranker_leaves": ([2], [1]),
    "ranker_network_rounds": ([0], [-1]),
    "ease_reg": ([0.0], [-1.0]),
    "slim_iterations": ([0], [-1]),
    "rounds": ([1], [0]),
    "client_fraction": ([1e-9, 1.0], [0.0, 1.01]),
    "eval_every": ([1], [0]),
    "min_clients": ([1], [0]),
    "local_epochs": ([1], [0]),
    "local_lr": ([1e-9], [0.0]),
    "batch_size": ([1], [0]),
    "prox_mu": ([0.0], [-0.1]),
    "server_lr": ([1e-9], [0.0]),
    "trim": ([0.0, 0.49], [-0.1, 0.5]),
    "clip_factor": ([1e-9], [0.0]),
    "attack_fraction": ([0.0, 1.0], [-0.1, 1.01]),
    "attack_scale": ([1e-9], [0.0]),
    "top_k": ([1], [0]),
    "task_retries": ([0], [-1]),
    "retry_backoff": ([0.0], [-0.1]),
    "min_fraction": ([0.0, 1.0], [-0.1, 1.01]),
    "round_timeout": ([1e-9], [0.0]),
    "round_retries": ([0], [-1]),
    "fault_probability": ([0.0, 1.0], [-0.1, 1.01]),
    "fault_delay": ([0.0], [-0.1]),
    "dp_epsilon": ([1e-9], [0.0]),
    "dp_delta": ([1e-12, 0.99], [0.0, 1.0]),
    "dp_max_items": ([1], [0]),
    "dp_budget": ([1e-9], [0.0]),
    "dp_budget_delta": ([1e-12, 0.99], [0.0, 1.0]),
    "min_delta": ([0.0], [-0.1]),
    "max_client_regression": ([0.0], [-0.1]),
}
# settings that only mean something beside another one
CONTEXT = {"dp_budget": {"dp_epsilon": 1.0}, "dp_budget_delta": {"dp_epsilon": 1.0}}


def test_every_bounded_setting_is_in_the_table():
    bounded = {
        name
        for name, field in TrainingConfig.model_fields.items()
        if any(type(m).__name__ in ("Ge", "Gt", "Le", "Lt") for m in field.metadata)
    }
    assert bounded == set(EDGES)


@pytest.mark.parametrize("name", sorted(EDGES))
def test_the_edge_is_allowed_and_one_step_past_it_is_refused_by_name(name):
    allowed, refused = EDGES[name]
    context = CONTEXT.get(name, {})
    for value in allowed:
        assert getattr(TrainingConfig(**context, **{name: value}), name) == value
    for value in refused:
        with pytest.raises(pydantic.ValidationError, match=name):
            TrainingConfig(**context, **{name: value})
