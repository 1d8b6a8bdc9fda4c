"""Mutation check of the core: change one operator or constant at a time in a core module, run
the unit tests that exercise it, and list the mutants no test noticed (the survivors).

A small runner of its own (no mutmut): mutants are made on the syntax tree (``ast``), one at a
time, in a copy of the committed tree (``git archive HEAD``), so the working copy is never
touched. Mutations: arithmetic operators (+ -, * /, ** *, // /), comparisons (< <=, > >=, == !=,
is / is not), ``and``/``or``, a dropped unary minus or ``not``, numeric constants (0 -> 1,
n -> n + 1, x -> 2x), ``+=``/``-=``. Docstrings and annotations are left alone.

Speed: one traced run of the unmutated tests first records, for every test, the lines of the
target modules it executes and its duration. A mutant then runs, fastest first, only the tests
that execute its line (every test of the module when the line also runs at import time, such as
a module constant or a default argument), with ``-x`` and a timeout scaled to those tests'
durations. A mutant those tests do not kill is run against every other test of its module's
files before it is called a survivor, so the selection only makes kills cheaper, never survivors
likelier. Each pytest run is a fork of a process that has numpy, pandas, scipy, scikit-learn,
cryptography and pytest imported already (never the project's modules, which every run imports
afresh from the mutated tree); ``--no-fork`` starts a fresh python instead. ``--jobs 2`` runs two
mutants at a time, each in its own copy of the tree.

    uv run python -m benchmarks.mutation                   # every target, 25 min budget
    uv run python -m benchmarks.mutation --budget 600 --only models/metrics.py
    uv run python -m benchmarks.mutation --skip 31                  # the mutants after the 31st
    uv run python -m benchmarks.mutation --every 3 --only models/privacy/shamir.py  # a sample
    uv run python -m benchmarks.mutation --recheck benchmarks/results/mutation.json  # survivors again

Writes benchmarks/results/mutation.json (counts per module, every tried mutant with its outcome
and the test that killed it, every survivor with its line, the commit the mutants came from).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import json
import os
import queue
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

_SECAGG_TESTS = ["tests/unit/test_secagg_plus.py", "tests/unit/test_secagg.py",
                 "tests/unit/test_secagg_mutants.py"]  # fmt: skip
_LOOP_TESTS = ["tests/flows/test_quorum.py", "tests/flows/test_neural_flow.py",
               "tests/flows/test_centralized_flow.py", "tests/flows/test_dp_flow.py",
               "tests/flows/test_resume_families.py", "tests/flows/test_secure_once.py",
               "tests/flows/test_ranking_flow.py", "tests/flows/test_private_evaluation.py",
               "tests/flows/test_private_releases.py", "tests/flows/test_reliability.py",
               "tests/flows/test_scale_flow.py", "tests/flows/test_training_flow.py"]  # fmt: skip
# module -> the unit tests that should notice a change in it
TARGETS: dict[str, list[str]] = {
    "models/aggregation.py": ["tests/unit/test_aggregation.py", "tests/unit/test_federated.py"],
    "models/mf/als.py": ["tests/unit/test_als.py", "tests/unit/test_federated.py"],
    "models/metrics.py": ["tests/unit/test_metrics.py"],
    "models/mf/implicit.py": ["tests/unit/test_implicit.py"],
    "models/mf/sgd.py": ["tests/unit/test_sgd.py", "tests/unit/test_federated.py"],
    "models/ranking/knn.py": ["tests/unit/test_ranking.py"],
    "models/privacy/dp.py": ["tests/unit/test_dp.py", "tests/unit/test_dp_bounds.py",
                             "tests/unit/test_dp_randomness.py", "tests/unit/test_secagg.py"],
    "models/privacy/fixed_point.py": _SECAGG_TESTS,
    "models/privacy/shamir.py": _SECAGG_TESTS,
    "models/privacy/secagg.py": _SECAGG_TESTS,
    "models/privacy/secagg_plus.py": _SECAGG_TESTS,
    "models/privacy/secagg_plus_client.py": _SECAGG_TESTS,
    "models/privacy/secagg_plus_server.py": _SECAGG_TESTS,
    "models/privacy/secagg_plus_driver.py": _SECAGG_TESTS,
    # an identity key is read through the private-file check: its refusals are tested there
    "models/privacy/identity.py": [*_SECAGG_TESTS, "tests/unit/test_private_files.py",
                                   "tests/unit/test_site_registry.py"],
    "models/privacy/wire.py": _SECAGG_TESTS,
    "models/privacy/ledger.py": ["tests/unit/test_ledger.py", "tests/unit/test_ledger_bounds.py"],
    "models/privacy/released_metrics.py": ["tests/unit/test_released_metrics.py",
                                           "tests/unit/test_released_metrics_bounds.py"],
    "models/privacy/redaction.py": ["tests/unit/test_redaction.py"],
    # a real site's data: its own tests first, then the site/coordinator tests that use them
    "models/sites/spec.py": ["tests/unit/test_site_schema.py", "tests/unit/test_site_process.py",
                             "tests/unit/test_site_secure.py", "tests/unit/test_site_coordinator.py",
                             "tests/unit/test_site_exchange.py"],
    "models/sites/budget.py": ["tests/unit/test_site_budget.py", "tests/unit/test_site_process.py",
                               "tests/unit/test_site_secure.py", "tests/unit/test_site_exchange.py"],
    "fedrec/sites/budget.py": ["tests/unit/test_site_budget.py", "tests/unit/test_site_process.py",
                               "tests/unit/test_site_secure.py", "tests/unit/test_site_exchange.py"],
    "models/sites/answers.py": ["tests/unit/test_site_answers.py", "tests/unit/test_site_process.py",
                                "tests/unit/test_site_secure.py", "tests/unit/test_site_exchange.py"],
    "models/sites/schema.py": ["tests/unit/test_site_schema.py", "tests/unit/test_site_process.py",
                               "tests/unit/test_site_secure.py", "tests/unit/test_site_coordinator.py",
                               "tests/unit/test_site_exchange.py"],
    "models/sites/messages.py": ["tests/unit/test_site_messages.py", "tests/unit/test_site_schema.py",
                                 "tests/unit/test_site_process.py", "tests/unit/test_site_secure.py",
                                 "tests/unit/test_site_coordinator.py",
                                 "tests/unit/test_site_exchange.py"],
    "models/sites/registry.py": ["tests/unit/test_site_registry.py", "tests/unit/test_cli_errors.py",
                                 "tests/unit/test_site_process.py", "tests/unit/test_site_secure.py",
                                 "tests/unit/test_site_coordinator.py",
                                 "tests/unit/test_site_exchange.py"],
    "models/sites/encoding.py": ["tests/unit/test_site_encoding.py", "tests/unit/test_npz_reads.py",
                                 "tests/unit/test_site_answers.py", "tests/unit/test_site_schema.py",
                                 "tests/unit/test_site_process.py", "tests/unit/test_site_secure.py",
                                 "tests/unit/test_site_coordinator.py",
                                 "tests/unit/test_site_exchange.py"],
    "models/sites/catalogue.py": ["tests/unit/test_site_catalogue.py",
                                  "tests/unit/test_site_registry.py",
                                  "tests/unit/test_site_process.py",
                                  "tests/unit/test_site_exchange.py"],
    "models/sites/sealing.py": ["tests/unit/test_site_sealing.py",
                                "tests/unit/test_site_sealing_mutants.py",
                                "tests/unit/test_site_messages.py",
                                "tests/unit/test_site_coordinator.py"],
    "models/ranking/ease.py": ["tests/unit/test_ease.py", "tests/unit/test_ranking.py"],
    "models/ranking/slim.py": ["tests/unit/test_slim.py"],
    "models/promotion.py": ["tests/unit/test_promotion.py", "tests/unit/test_popularity_baseline.py"],
    "models/data/sharding.py": ["tests/unit/test_sharding.py",
                                "tests/unit/test_sharding_mutants.py",
                                "tests/unit/test_validation.py"],
    "models/federation/sampling.py": ["tests/unit/test_federated.py",
                                      "tests/unit/test_dp_randomness.py",
                                      "tests/unit/test_sampling_mutants.py"],
    "models/federation/evaluation.py": ["tests/unit/test_metrics.py",
                                        "tests/unit/test_popularity_baseline.py",
                                        "tests/unit/test_families.py",
                                        "tests/unit/test_evaluation_mutants.py"],
    "models/neural/network.py": ["tests/unit/test_neural.py",
                                 "tests/unit/test_network_mutants.py"],
    # what bad input and served requests pass through (test_cli_fast.py covers the same checks
    # through the CLI, one subprocess a test: minutes per surviving mutant, so it is left out)
    "models/data/validate.py": ["tests/unit/test_validation.py", "tests/unit/test_movielens.py",
                                "tests/unit/test_catalogue.py",
                                "tests/unit/test_validate_mutants.py"],
    "models/data/readers.py": ["tests/unit/test_validation.py", "tests/unit/test_movielens.py",
                               "tests/unit/test_catalogue.py",
                               "tests/unit/test_readers_mutants.py"],
    "models/data/schema.py": ["tests/unit/test_validation.py", "tests/unit/test_movielens.py",
                              "tests/unit/test_catalogue.py", "tests/unit/test_synthetic.py",
                              "tests/unit/test_schema_mutants.py"],
    "models/recommenders.py": ["tests/unit/test_recommender.py", "tests/unit/test_ranking.py",
                               "tests/unit/test_recommenders_mutants.py"],
    # a loaded model's own code: the tests register it and load it in fresh interpreters
    "fedrec/serving/pyfunc.py": ["tests/unit/test_pyfunc_code.py"],
    "models/ranking/features.py": ["tests/unit/test_ranking.py", "tests/unit/test_slim.py",
                                   "tests/unit/test_features_mutants.py"],
    # the splits a client evaluates (the selection users among them) and the re-ranker's data
    "models/client.py": ["tests/unit/test_sharding.py", "tests/unit/test_ranking.py",
                         "tests/unit/test_popularity_baseline.py", "tests/unit/test_families.py",
                         "tests/unit/test_ranking_federated_mutants.py"],
    "models/ranking/federated.py": ["tests/unit/test_ranking.py", "tests/unit/test_families.py",
                                    "tests/unit/test_popularity_baseline.py",
                                    "tests/unit/test_slim.py",
                                    "tests/unit/test_ranking_federated_mutants.py"],
    # the reference round loop every family runs through, and the two-stage family over it
    "models/federation/loop.py": ["tests/unit/test_families.py", "tests/unit/test_core_wiring.py",
                                  "tests/unit/test_two_stage_family_mutants.py",
                                  "tests/unit/test_dp_randomness.py",
                                  "tests/unit/test_task_run_names.py"],
    "models/ranking/family.py": ["tests/unit/test_families.py", "tests/unit/test_ranking.py",
                                 "tests/unit/test_ranking_federated_mutants.py",
                                 "tests/unit/test_two_stage_family_mutants.py",
                                 "tests/unit/test_popularity_baseline.py",
                                 "tests/unit/test_cohorts.py", "tests/unit/test_slim.py"],
    "models/mf/family.py": ["tests/unit/test_families.py", "tests/unit/test_federated.py",
                            "tests/unit/test_secure_mean.py", "tests/unit/test_cohorts.py",
                            "tests/unit/test_dp.py", "tests/unit/test_site_weights.py",
                            "tests/unit/test_mf_neural_family_mutants.py"],
    "models/neural/family.py": ["tests/unit/test_families.py", "tests/unit/test_neural.py",
                                "tests/unit/test_site_weights.py",
                                "tests/unit/test_mf_neural_family_mutants.py"],
    "models/neural/federated.py": ["tests/unit/test_neural.py",
                                   "tests/unit/test_network_mutants.py",
                                   "tests/unit/test_neural_federated_mutants.py"],
    # the defences against malicious updates, the server's optimizers, the shared solves
    "models/robust.py": ["tests/unit/test_robust.py", "tests/unit/test_config.py",
                         "tests/unit/test_robust_mutants.py"],
    "models/server_optimizers.py": ["tests/unit/test_server_optimizers.py",
                                    "tests/unit/test_neural.py"],
    "models/mf/linalg.py": ["tests/unit/test_linalg.py", "tests/unit/test_als.py",
                            "tests/unit/test_dp.py", "tests/unit/test_dp_bounds.py"],
    "models/mf/recommend.py": ["tests/unit/test_recommender.py",
                               "tests/unit/test_mf_recommend_mutants.py"],
    "models/ranking/boosting.py": ["tests/unit/test_ranking.py",
                                   "tests/unit/test_ranking_federated_mutants.py",
                                   "tests/unit/test_two_stage_family_mutants.py",
                                   "tests/unit/test_boosting_mutants.py"],
    "models/cohorts.py": ["tests/unit/test_cohorts.py", "tests/unit/test_dp_randomness.py"],
    # the explicit family's reference loop, the served models, the networks' training, the
    # partitions a run builds and the update format clients send
    "models/mf/federated.py": ["tests/unit/test_federated.py", "tests/unit/test_als.py",
                               "tests/unit/test_dp.py", "tests/unit/test_secure_mean.py",
                               "tests/unit/test_site_weights.py", "tests/unit/test_robust.py",
                               "tests/unit/test_mf_neural_family_mutants.py",
                               "tests/unit/test_families.py", "tests/unit/test_core_wiring.py",
                               "tests/unit/test_dp_wiring.py", "tests/unit/test_secagg.py",
                               "tests/unit/test_mf_federated_mutants.py"],
    "models/ranking/recommender.py": ["tests/unit/test_ranking.py", "tests/unit/test_slim.py",
                                      "tests/unit/test_recommender.py",
                                      "tests/unit/test_served_mutants.py"],
    "models/neural/training.py": ["tests/unit/test_neural.py",
                                  "tests/unit/test_neural_federated_mutants.py",
                                  "tests/unit/test_network_mutants.py",
                                  "tests/unit/test_core_wiring.py",
                                  "tests/unit/test_neural_training_mutants.py"],
    "models/neural/recommender.py": ["tests/unit/test_neural.py", "tests/unit/test_recommender.py",
                                     "tests/unit/test_ranking.py",
                                     "tests/unit/test_served_mutants.py"],
    # the read of a registered model that `fedrec recommend` and `predict` serve from
    "fedrec/model_store.py": ["tests/unit/test_model_store.py", "tests/unit/test_cli_workspaces.py",
                              "tests/unit/test_cli_fast.py"],
    "models/mf/recommender.py": ["tests/unit/test_recommender.py",
                                 "tests/unit/test_recommenders_mutants.py",
                                 "tests/unit/test_served_mutants.py"],
    "models/data/partitions.py": ["tests/unit/test_sharding.py",
                                  "tests/unit/test_sharding_mutants.py",
                                  "tests/unit/test_cli_workspaces.py"],
    "models/protocol.py": ["tests/unit/test_npz_reads.py", "tests/unit/test_site_encoding.py",
                           "tests/unit/test_site_contents.py", "tests/unit/test_secagg.py",
                           "tests/unit/test_site_weights.py", "tests/unit/test_cohorts.py",
                           "tests/unit/test_protocol.py"],
    # the run's settings: what a flag or a deployment's parameters may hold
    "fedrec/inputs.py": ["tests/unit/test_validation.py", "tests/unit/test_cli_fast.py",
                         "tests/unit/test_cli_workspaces.py"],
    "fedrec/config.py": ["tests/unit/test_config.py", "tests/unit/test_dp.py",
                         "tests/unit/test_site_config.py", "tests/unit/test_deployment_check.py",
                         "tests/unit/test_config_bounds.py", "tests/unit/test_config_mutants.py",
                         "tests/unit/test_redaction.py"],
    # flow tests (a Prefect test server and a real MLflow store each): sample with --every
    "tasks/tracking.py": ["tests/unit/test_redaction.py", "tests/unit/test_private_files.py",
                          "tests/unit/test_run_params.py",
                          "tests/flows/test_repeated_version.py",
                          "tests/flows/test_promotion_safety.py", "tests/flows/test_rollback.py",
                          "tests/flows/test_register_retries.py",
                          "tests/flows/test_promotion_lock.py", "tests/flows/test_baseline_gate.py",
                          "tests/flows/test_lost_runs.py", "tests/flows/test_ledger_flow.py",
                          "tests/flows/test_safe_loading.py",
                          "tests/flows/test_redacted_logging.py", "tests/flows/test_cli.py",
                          "tests/flows/test_resume_families.py",
                          "tests/flows/test_private_releases.py",
                          "tests/flows/test_training_flow.py", "tests/flows/test_ranking_flow.py",
                          "tests/flows/test_held_out_rows.py"],
    # the flow's server steps (checkpoints, promotion), client tasks and data tasks
    "tasks/server.py": ["tests/unit/test_promotion.py", "tests/unit/test_core_wiring.py",
                        "tests/unit/test_task_run_names.py",
                        "tests/flows/test_training_flow.py", "tests/flows/test_resume_families.py",
                        "tests/flows/test_secure_once.py", "tests/flows/test_baseline_gate.py",
                        "tests/flows/test_promotion_safety.py", "tests/flows/test_neural_flow.py",
                        "tests/flows/test_ranking_flow.py"],
    "tasks/clients.py": ["tests/unit/test_core_wiring.py", "tests/unit/test_task_run_names.py",
                         "tests/unit/test_dp_randomness.py", "tests/flows/test_training_flow.py",
                         "tests/flows/test_resume_families.py", "tests/flows/test_privacy_flow.py",
                         "tests/flows/test_reliability.py", "tests/flows/test_quorum.py"],
    "tasks/data.py": ["tests/unit/test_config.py", "tests/flows/test_by_key_file.py",
                      "tests/flows/test_held_out_rows.py", "tests/flows/test_bad_input_cli.py",
                      "tests/flows/test_training_flow.py", "tests/flows/test_private_releases.py",
                      "tests/flows/test_resume_families.py", "tests/flows/test_ledger_flow.py"],
    # the flow's secure-aggregation steps: client keys, held updates, the server's state
    "tasks/secure.py": ["tests/flows/test_secure_steps.py", "tests/flows/test_secure_once.py",
                        "tests/flows/test_secure_flow.py",
                        "tests/flows/test_privacy_flow.py", "tests/flows/test_secure_dask.py"],
    # the proxy tasks that stand for real sites in the round loop
    "tasks/remote.py": ["tests/flows/test_site_proxies.py", "tests/flows/test_site_retries.py"],
    # the round loop every family runs through, and the steps of a round it calls
    "flows/loop.py": [*_LOOP_TESTS, "tests/flows/test_promotion_safety.py"],
    "flows/rounds.py": ["tests/unit/test_progress.py", "tests/unit/test_privacy_plan.py", *_LOOP_TESTS],
    # the protocol half of a securely aggregated round: phases, left-out clients, the threshold
    "flows/secure.py": ["tests/flows/test_secure_steps.py", "tests/flows/test_secure_once.py",
                        "tests/flows/test_secure_flow.py", "tests/flows/test_privacy_flow.py",
                        "tests/flows/test_secure_dask.py", "tests/flows/test_dp_flow.py"],
    # which family a run builds: the data's rating scale, the DP plan, the public catalogue
    "flows/families.py": ["tests/flows/test_build_family.py",
                          "tests/flows/test_training_flow.py", "tests/flows/test_dp_flow.py",
                          "tests/flows/test_ranking_flow.py", "tests/flows/test_neural_flow.py",
                          "tests/flows/test_private_releases.py",
                          "tests/flows/test_untrained_items.py"],
    # a run over real sites: enrolment, the catalogue, the manifest, the run's tags
    "flows/sites.py": ["tests/flows/test_enrolment.py", "tests/flows/test_site_proxies.py"],
    # a site's own process (what it answers, refuses and keeps) and the coordinator's checks of
    # what a site sent
    "fedrec/sites/process.py": ["tests/unit/test_site_process.py",
                                "tests/unit/test_site_secure.py",
                                "tests/unit/test_site_exchange.py",
                                "tests/flows/test_site_events.py"],
    "fedrec/sites/secure.py": ["tests/unit/test_site_secure.py", "tests/unit/test_site_exchange.py"],
    "fedrec/sites/transport.py": ["tests/unit/test_site_transport.py"],
    # owner-only files: held updates, kept answers, secrets, budgets
    "models/files.py": ["tests/unit/test_private_files.py", "tests/unit/test_site_process.py",
                        "tests/unit/test_site_secure.py",
                        "tests/unit/test_secagg_plus.py"],  # public keys read as private files
    "fedrec/sites/coordinator.py": ["tests/unit/test_site_coordinator.py",
                                    "tests/unit/test_site_exchange.py",
                                    "tests/unit/test_site_secure.py",
                                    "tests/flows/test_site_retries.py",
                                    "tests/flows/test_enrolment.py"],
    # the training flow: set-up, the checks before a run starts, promotion's notes, the end
    "flows/training.py": ["tests/unit/test_training_entry.py", "tests/flows/test_training_flow.py",
                          "tests/flows/test_held_out_rows.py", "tests/flows/test_ledger_flow.py",
                          "tests/flows/test_private_releases.py",
                          "tests/flows/test_resume_families.py",
                          "tests/flows/test_ranking_flow.py", "tests/flows/test_rollback.py",
                          "tests/flows/test_repeated_version.py",
                          "tests/flows/test_promotion_safety.py",
                          "tests/flows/test_baseline_gate.py", "tests/flows/test_cli.py",
                          "tests/flows/test_lost_runs.py", "tests/flows/test_dp_flow.py",
                          "tests/flows/test_secure_dask.py"],
    # the one line bad input gets, and the readers of the data a run starts from
    "models/data/errors.py": ["tests/unit/test_error_messages.py",
                              "tests/unit/test_validation.py", "tests/unit/test_movielens.py",
                              "tests/unit/test_catalogue.py", "tests/unit/test_cli_errors.py",
                              "tests/unit/test_readers_mutants.py",
                              "tests/unit/test_validate_mutants.py",
                              "tests/unit/test_schema_mutants.py"],
    "models/data/movielens.py": ["tests/unit/test_movielens.py", "tests/unit/test_validation.py"],
    "models/data/synthetic.py": ["tests/unit/test_synthetic.py", "tests/unit/test_sharding.py",
                                 "tests/unit/test_catalogue.py"],
    # what every family declares, the explicit family's settings, a site's contents
    "models/federation/family.py": ["tests/unit/test_secure_phases.py",
                                    "tests/unit/test_families.py",
                                    "tests/unit/test_core_wiring.py"],
    "models/mf/params.py": ["tests/unit/test_recommender.py", "tests/unit/test_model_store.py",
                            "tests/unit/test_als.py", "tests/unit/test_implicit.py",
                            "tests/unit/test_core_wiring.py",
                            "tests/unit/test_mf_federated_mutants.py"],
    "models/sites/contents.py": ["tests/unit/test_site_contents.py"],
    # the stores a run names, the deployment's parameters, the process's threads, the CLI's
    # one-line refusals
    "fedrec/stores.py": ["tests/unit/test_stores_parts.py", "tests/unit/test_stores_record.py"],
    # make deploy's last steps: their arguments without a server, their writes on a real one
    "fedrec/lock_parameters.py": ["tests/unit/test_deployment_check.py", "tests/flows/test_cli.py"],
    "fedrec/silent_runs.py": ["tests/unit/test_deployment_check.py", "tests/flows/test_cli.py"],
    "fedrec/deployment_check.py": ["tests/unit/test_deployment_check.py"],
    "fedrec/runtime.py": ["tests/unit/test_freed_memory.py", "tests/unit/test_blas_threads.py",
                          "tests/unit/test_foreground_flow.py", "tests/flows/test_lost_runs.py"],
    "fedrec/cli_errors.py": ["tests/unit/test_cli_errors.py", "tests/unit/test_private_files.py",
                             "tests/unit/test_deployment_check.py",
                             "tests/unit/test_cli_workspaces.py"],
    # the readers' parse errors, fault injection, the run's Prefect artifacts, the command
    # line's shared flags and its budget, stores and workspaces groups
    "models/data/tables.py": ["tests/unit/test_validation.py", "tests/unit/test_movielens.py",
                              "tests/unit/test_recommenders_mutants.py",
                              "tests/unit/test_error_messages.py"],
    "tasks/faults.py": ["tests/unit/test_fault_plan.py", "tests/unit/test_config_bounds.py",
                        "tests/flows/test_reliability.py"],
    "tasks/reporting.py": ["tests/flows/test_training_flow.py", "tests/flows/test_lost_runs.py"],
    "fedrec/config_flags.py": ["tests/unit/test_config_flags.py", "tests/unit/test_cli_fast.py",
                               "tests/unit/test_readme_flags.py",
                               "tests/unit/test_cli_errors.py"],
    "fedrec/cli_budget.py": ["tests/unit/test_cli_budget.py", "tests/flows/test_ledger_flow.py"],
    "fedrec/cli_stores.py": ["tests/unit/test_cli_stores.py", "tests/unit/test_cli_fast.py",
                             "tests/unit/test_stores_record.py"],
    "fedrec/cli_workspaces.py": ["tests/unit/test_cli_workspaces.py",
                                 "tests/unit/test_cli_fast.py"],
    "fedrec/sites/cli.py": ["tests/unit/test_site_cli.py", "tests/unit/test_cli_fast.py"],
    "fedrec/local_server.py": ["tests/unit/test_local_server_parts.py",
                               "tests/flows/test_local_server.py", "tests/unit/test_cli_errors.py",
                               "tests/unit/test_stores_parts.py"],
    # the command line's main group, train, serve and server (the flow tests that start
    # servers for it are left out: minutes a mutant; survivors are checked against them by hand)
    "fedrec/cli.py": ["tests/unit/test_cli_main_parts.py",
                      "tests/unit/test_cli_errors.py", "tests/unit/test_readme_flags.py",
                      "tests/unit/test_cli_workspaces.py", "tests/unit/test_cli_stores.py",
                      "tests/unit/test_cli_budget.py", "tests/unit/test_cli_fast.py"],
    # the sites demo: its tests start PostgreSQL, both servers and three site processes, and
    # are marked slow and realdata (run it with `--markers "slow or not slow"`)
    "fedrec/sites_demo.py": ["tests/unit/test_sites_demo_split.py",
                             "tests/unit/test_sites_demo_parts.py",
                             "tests/e2e/test_site_isolation.py", "tests/e2e/test_sites_demo.py"],
    "fedrec/cli_models.py": ["tests/unit/test_cli_models_parts.py", "tests/unit/test_safe_formats.py",
                             "tests/unit/test_cli_errors.py", "tests/flows/test_cli.py",
                             "tests/flows/test_rollback.py", "tests/unit/test_cli_fast.py",
                             # the failed Prefect flow runs fedrec runs lists (refusals)
                             "tests/flows/test_ledger_flow.py"],
}  # fmt: skip
# unit tests too slow to run once per mutant (minutes under load): utility-vs-epsilon curves
DESELECT = "not trades"
FILTERS = ["-m", "not slow and not realdata", "-k", DESELECT]
# contexts of lines run outside any test: imports, collection, module-scoped teardown
_OUTSIDE = "<outside>"

_SWAP = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.Pow: ast.Mult, ast.FloorDiv: ast.Div, ast.Mod: ast.Mult,
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And,
}  # fmt: skip


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int  # the index-th mutation site of the module, in tree order
    line: int
    description: str
    end_line: int = 0  # the last line of the mutated node
    key: str = ""  # description, line text and occurrence: the same mutant across commits


def _skipped(tree: ast.AST) -> set[int]:
    """ids of nodes that must not be mutated: docstrings and annotations."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                skip.add(id(body[0].value))
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations.append(node.returns)
        if isinstance(node, ast.arg):
            annotations.append(node.annotation)
        if isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for annotation in annotations:
            if annotation is not None:
                skip |= {id(n) for n in ast.walk(annotation)}
    return skip


def _sites(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    """Every mutation site, in tree order: (node, what the mutation does)."""
    skip = _skipped(tree)
    out: list[tuple[ast.AST, str]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if (isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _SWAP) or isinstance(
            node, ast.BoolOp
        ):
            out.append((node, f"{type(node.op).__name__} -> {_SWAP[type(node.op)].__name__}"))
        elif isinstance(node, ast.Compare) and type(node.ops[0]) in _SWAP:
            out.append(
                (node, f"{type(node.ops[0]).__name__} -> {_SWAP[type(node.ops[0])].__name__}")
            )
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            out.append((node, f"drop {type(node.op).__name__}"))
        elif (isinstance(node, ast.Constant) and type(node.value) in (int, float)
              and not isinstance(node.value, bool)):  # fmt: skip
            out.append((node, f"constant {node.value!r} -> {_mutated_constant(node.value)!r}"))
    return out


def _mutated_constant(value: float) -> float:
    if value == 0:
        return 1
    return value + 1 if isinstance(value, int) else value * 2


class _Apply(ast.NodeTransformer):
    def __init__(self, target: ast.AST) -> None:
        self.target = target

    def generic_visit(self, node: ast.AST) -> ast.AST:
        node = super().generic_visit(node)
        if node is not self.target:
            return node
        if isinstance(node, (ast.BinOp, ast.AugAssign, ast.BoolOp)):
            node.op = _SWAP[type(node.op)]()
        elif isinstance(node, ast.Compare):
            node.ops = [_SWAP[type(node.ops[0])](), *node.ops[1:]]
        elif isinstance(node, ast.UnaryOp):
            return node.operand
        elif isinstance(node, ast.Constant):
            node.value = _mutated_constant(node.value)
        return node


def mutants(module: str, source: str) -> tuple[list[Mutant], ast.AST]:
    tree = ast.parse(source)
    lines = source.splitlines()
    seen: dict[tuple[str, str], int] = {}
    found = []
    for i, (node, what) in enumerate(_sites(tree)):
        line = getattr(node, "lineno", 0)
        text = " ".join(lines[line - 1].split()) if line else ""
        occurrence = seen[what, text] = seen.get((what, text), -1) + 1
        end = getattr(node, "end_lineno", None) or line
        found.append(Mutant(module, i, line, what, end, f"{what} @ {text} #{occurrence}"))
    return found, tree


def mutated_source(tree: ast.AST, index: int) -> str:
    clone = copy.deepcopy(tree)
    node, _ = _sites(clone)[index]
    return ast.unparse(ast.fix_missing_locations(_Apply(node).visit(clone)))


def _trace_worker(out: str, modules: list[str], pytest_args: list[str]) -> None:
    """Run pytest in this process, recording which lines of ``modules`` each test executes."""
    import pytest

    wanted = {str(Path(m).resolve()): m for m in modules}
    names: dict[str, str | None] = {}
    hits: dict[str, dict[str, set[int]]] = {}
    durations: dict[str, float] = {}
    context = [_OUTSIDE]

    def local(frame, event, arg):
        if event == "line":
            hits.setdefault(context[0], {}).setdefault(names[frame.f_code.co_filename], set()).add(
                frame.f_lineno
            )
        return local

    def call(frame, event, arg):
        filename = frame.f_code.co_filename
        if filename not in names:
            names[filename] = wanted.get(os.path.realpath(filename))
        return local if names[filename] is not None else None

    class Recorder:
        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_protocol(self, item, nextitem):
            context[0] = item.nodeid
            started = time.perf_counter()
            yield
            durations[item.nodeid] = time.perf_counter() - started
            context[0] = _OUTSIDE

    sys.settrace(call)
    threading.settrace(call)
    code = pytest.main(pytest_args, plugins=[Recorder()])
    sys.settrace(None)
    threading.settrace(None)  # type: ignore[arg-type]
    result = {"returncode": int(code), "durations": durations,
              "hits": {c: {m: sorted(s) for m, s in f.items()} for c, f in hits.items()}}  # fmt: skip
    Path(out).write_text(json.dumps(result))


def _tree_env(tree_dir: Path) -> dict[str, str]:
    """The environment of a test run in a copied tree: its code first on the path, and the
    shared datasets where this checkout finds them (a copy in a temporary folder has no
    ``../shared`` beside it, and tests that name a dataset would fail unmutated)."""
    datasets = os.environ.get("FEDREC_DATASETS") or str(REPO.parent / "shared" / "datasets")
    return os.environ | {"PYTHONPATH": str(tree_dir), "PYTHONDONTWRITEBYTECODE": "1",
                         "FEDREC_DATASETS": datasets}  # fmt: skip


def _trace(tree_dir: Path, modules: list[str], tests: list[str], timeout: float) -> dict:
    """Run ``tests`` once, unmutated and traced: each test's duration and the lines it runs."""
    out = tree_dir / ".mutation-trace.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--trace-worker", str(out),
               *[f"--only={m}" for m in modules], "--", "-q", "-p", "no:cacheprovider",
               *FILTERS, *tests]  # fmt: skip
    env = _tree_env(tree_dir)
    done = subprocess.run(command, cwd=tree_dir, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    if not out.exists():
        raise SystemExit(
            f"the traced run wrote nothing:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    trace = json.loads(out.read_text())
    out.unlink()
    if trace["returncode"] != 0:
        raise SystemExit(f"the unit tests fail without any mutation:\n{done.stdout[-3000:]}")
    return trace


@dataclass
class _Plan:
    """What one module's mutants run: its test files, and per test its duration and lines."""

    files: list[str]
    durations: dict[str, float]
    lines: dict[str, set[int]]  # test node id -> the module's lines it executes
    outside: set[int]  # lines run outside any test (imports, collection)

    def covering(self, mutant: Mutant) -> list[str]:
        span = set(range(mutant.line, max(mutant.end_line, mutant.line) + 1))
        in_files = [t for t in self.durations if t.split("::")[0] in self.files]
        if span & self.outside:
            chosen = in_files
        else:
            chosen = [t for t in in_files if span & self.lines.get(t, set())]
        return sorted(chosen, key=lambda t: self.durations[t])

    def seconds(self, tests: list[str]) -> float:
        return sum(self.durations.get(t, 0.0) for t in tests)


def _plan(module: str, files: list[str], trace: dict) -> _Plan:
    lines: dict[str, set[int]] = {}
    for context, per_module in trace["hits"].items():
        if module in per_module:
            lines[context] = set(per_module[module])
    outside = lines.pop(_OUTSIDE, set())
    return _Plan(files, trace["durations"], lines, outside)


# third-party modules a forked test run finds already imported (never models.* or tests.*)
_PRELOAD = ("numpy", "pandas", "scipy.stats", "scipy.sparse", "sklearn.cluster", "pyarrow",
            "cryptography.hazmat.primitives.ciphers", "cryptography.hazmat.primitives.kdf.hkdf",
            "cryptography.hazmat.primitives.asymmetric.x25519", "hypothesis", "pytest",
            "_pytest.python", "pytest_timeout", "pytest_benchmark.plugin")  # fmt: skip


def _descendants(root: int) -> list[int]:
    """Every live process below ``root``, read from /proc (sessions of their own included).
    ``fedrec.local_server.descendants`` does the same, but the zygote imports no project module:
    every later fork would inherit it unmutated."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _become_subreaper() -> bool:
    """Make this process the one that inherits the orphans of its descendants (Linux's
    ``PR_SET_CHILD_SUBREAPER``), so that what a test run leaves behind stays findable below it
    after the run has exited."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _end_strays() -> None:
    """Kill and reap every process left below this one: a run that has ended owns nothing any
    more, so what it started and did not stop (a server in a session of its own, whose test was
    killed, or whose mutant broke its teardown) goes with it."""
    for _ in range(100):
        stray = _descendants(os.getpid())
        for other in stray:
            with contextlib.suppress(ProcessLookupError):
                os.kill(other, 9)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        if not stray:
            return
        time.sleep(0.05)


def _zygote() -> None:
    """Serve test runs from stdin: fork a child of this process (heavy imports done) per run.

    A request is one JSON line ``{"args": [...], "log": path, "timeout": seconds}``; the answer
    is ``{"code": exit code or "timeout"}``. The child imports the project's modules itself,
    so each run sees the files as they are on disk at that moment.
    """
    import importlib

    for name in _PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("models", "tests", "fedrec"))
    if leaked:
        raise SystemExit(f"the preload imported project modules: {leaked[:5]}")
    if not _become_subreaper():
        print("mutation: not a child subreaper: servers a test run leaves may outlive it",
              file=sys.stderr)  # fmt: skip
    reply = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        reply.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: one pytest run, its output to the log
            code = 70
            try:
                os.setpgid(0, 0)
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(log, 1)
                os.dup2(log, 2)
                import pytest

                code = int(pytest.main(request["args"]))
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
        deadline = time.monotonic() + request["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                # its servers in sessions of their own (Prefect's test server) are outside the
                # group: they come to this process, the subreaper, and _end_strays ends them
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, 9)
                os.waitpid(pid, 0)
                code = "timeout"
                break
            time.sleep(0.02)
        _end_strays()
        reply.write(json.dumps({"code": code}) + "\n")
        reply.flush()


class _Runner:
    """Runs pytest in one tree: forked from a zygote (the default) or as a fresh process."""

    def __init__(self, tree_dir: Path, fork: bool) -> None:
        self.tree_dir = tree_dir
        self.env = _tree_env(tree_dir)
        self.log = tree_dir / ".mutation-pytest.log"
        self.zygote = None
        if fork:
            self.zygote = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--zygote"],
                cwd=tree_dir, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.stdin.close()
            self.zygote.wait(timeout=60)

    def run(self, tests: list[str], timeout: float) -> tuple[str, str]:
        """('killed' (a test failed), 'survived' (all passed) or 'timeout', the failing test)."""
        args = ["-x", "-q", "-p", "no:cacheprovider", "-rf", *FILTERS, *tests]
        if self.zygote is not None:
            request = {"args": args, "log": str(self.log), "timeout": timeout}
            self.zygote.stdin.write(json.dumps(request) + "\n")
            self.zygote.stdin.flush()
            answer = self.zygote.stdout.readline()
            if not answer:
                raise RuntimeError(f"the test zygote of {self.tree_dir} died")
            code = json.loads(answer)["code"]
            output = self.log.read_text(errors="replace") if self.log.exists() else ""
        else:
            try:
                done = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=self.tree_dir,
                                      env=self.env, capture_output=True, text=True,
                                      timeout=timeout)  # fmt: skip
            except subprocess.TimeoutExpired:
                return "timeout", ""
            code, output = done.returncode, done.stdout
        if code == "timeout":
            return "timeout", ""
        if code == 0:
            return "survived", ""
        if code == 5:  # no test collected: a mutant that breaks collection is killed too
            return "killed", "(no tests ran)"
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
        return "killed", failed[0] if failed else f"(pytest exit {code})"


def _timeout(seconds: float, cap: float) -> float:
    return min(cap, 60 + 5 * seconds)


def _run_mutant(mutant: Mutant, plan: _Plan, runner: _Runner, tree: ast.AST, cap: float) -> dict:
    """Run one mutant in ``tree_dir``: the covering tests first, then every test of the module."""
    target = runner.tree_dir / mutant.module
    source = target.read_text()
    started = time.monotonic()
    covering = plan.covering(mutant)
    try:
        target.write_text(mutated_source(tree, mutant.index))
        outcome, killer, stage = "survived", "", "none"
        if covering:
            outcome, killer = runner.run(covering, _timeout(plan.seconds(covering), cap))
            stage = "covering"
        if outcome == "survived":
            # every other test of the module's files (the traced run listed them all)
            rest = [
                t for t in plan.durations if t.split("::")[0] in plan.files and t not in covering
            ]
            rest.sort(key=lambda t: plan.durations[t])
            if rest:
                outcome, killer = runner.run(rest, _timeout(plan.seconds(rest), cap))
                stage = "rest"
    finally:
        target.write_text(source)
    return {**asdict(mutant), "outcome": outcome, "killed_by": killer, "stage": stage,
            "covering_tests": len(covering), "seconds": round(time.monotonic() - started, 1)}  # fmt: skip


def _snapshot(folder: Path) -> None:
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")


def _git_show(commit: str, path: str) -> str | None:
    done = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, capture_output=True,
                          text=True)  # fmt: skip
    return done.stdout if done.returncode == 0 else None


def tried_keys(result_file: str) -> dict[str, set[str]]:
    """The keys of the mutants a previous result tried, per module.

    Results that list every outcome give them directly; older ones (counts only) are rebuilt
    from their commit: they tried each module's mutants ``skip`` to ``skip + tried`` in order.
    """
    result = json.loads(Path(result_file).read_text())
    keys: dict[str, set[str]] = {}
    if "outcomes" in result:
        for o in result["outcomes"]:
            keys.setdefault(o["module"], set()).add(o["key"])
        return keys
    commit = str(result["commit"]).split()[0]
    for module, r in result["modules"].items():
        source = _git_show(commit, module)
        if source is None:
            continue
        found, _ = mutants(module, source)
        if r.get("recheck") or result.get("recheck"):
            wanted = {(s["index"], s["description"]) for s in r["survived"]}
            found = [m for m in found if (m.index, m.description) in wanted]
        else:
            skip = result.get("skip", 0)
            found = found[skip : skip + r["tried"]]
        keys.setdefault(module, set()).update(m.key for m in found)
    return keys


def survivor_keys(result_file: str) -> set[tuple[str, str]]:
    """(module, key) of a previous result's survivors; keys of results that did not record them
    are rebuilt from the result's commit (the index-th mutant of the module there)."""
    result = json.loads(Path(result_file).read_text())
    commit = str(result["commit"]).split()[0]
    out: set[tuple[str, str]] = set()
    for module, r in result["modules"].items():
        found = None
        for s in r["survived"]:
            if s.get("key"):
                out.add((module, s["key"]))
                continue
            if found is None:
                found, _ = mutants(module, _git_show(commit, module) or "")
            mutant = found[s["index"]]
            if mutant.description != s["description"] or mutant.line != s["line"]:
                raise SystemExit(f"{result_file}: {module} mutant {s['index']} is not at {commit}")
            out.add((module, mutant.key))
    return out


def _write(args, modules, plans, outcomes, commit, started, load_before, gone=None) -> dict:
    """Write the result file (also after every mutant, so a cut run keeps what it did)."""
    report: dict[str, dict] = {}
    for module in modules:
        tried = [o for o in outcomes if o["module"] == module]
        plan, found, _, total = plans[module]
        report[module] = {
            "sites": total,
            "mutants": len(found),
            "tried": len(tried),
            "killed": sum(o["outcome"] in ("killed", "timeout") for o in tried),
            "timeouts": sum(o["outcome"] == "timeout" for o in tried),
            "survived": [
                {k: o[k] for k in ("module", "index", "line", "description", "key")}
                for o in tried
                if o["outcome"] == "survived"
            ],
            "tests": plan.files,
        }
        if gone and gone.get(module):
            report[module]["recheck_gone"] = gone[module]  # the code changed: nothing to run
    result = {"seconds": round(time.monotonic() - started), "budget": args.budget,
              "commit": commit, "skip": args.skip, "every": args.every, "jobs": args.jobs,
              "recheck": args.recheck, "not_in": args.not_in, "deselect": args.deselect,
              "load_average": {"start": [round(x, 1) for x in load_before],
                               "end": [round(x, 1) for x in os.getloadavg()]},
              "modules": report, "outcomes": outcomes}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    if (sys.argv[1:] if argv is None else argv) == ["--zygote"]:
        _zygote()  # before benchmarks.common, whose imports include the project's data modules
        return
    from benchmarks.common import HelpFormatter

    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--budget", type=float, default=1500, help="seconds for all mutants")
    parser.add_argument("--only", action="append", help="a module of TARGETS (repeatable)")
    parser.add_argument("--test-timeout", type=float, default=300, help="cap of one pytest run")
    parser.add_argument("--skip", type=int, default=0, help="leave out each module's first N")
    parser.add_argument("--every", type=int, default=1, help="a sample: every k-th mutant")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at the same time")
    parser.add_argument("--recheck", action="append",
                        help="a previous result: run only its survivors again (repeatable)")  # fmt: skip
    parser.add_argument("--not-in", action="append", default=[],
                        help="a previous result: leave out the mutants it tried")  # fmt: skip
    parser.add_argument("--deselect", action="append", default=[],
                        help="a test node id to leave out (one broken at HEAD for other reasons)")  # fmt: skip
    parser.add_argument("--markers", default=FILTERS[1],
                        help="the tests' marker expression (`not realdata` takes the slow ones "
                        "too: a module whose every start of a server is in a slow test)")  # fmt: skip
    parser.add_argument("--out", default=str(RESULTS / "mutation.json"))
    parser.add_argument("--no-fork", action="store_true",
                        help="a fresh python per test run instead of forking a preloaded one")  # fmt: skip
    parser.add_argument("--trace-worker", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.trace_worker:
        _trace_worker(args.trace_worker, args.only, rest[1:] if rest[:1] == ["--"] else rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    FILTERS[1] = args.markers
    FILTERS.extend(f"--deselect={node}" for node in args.deselect)
    recheck = None
    if args.recheck:
        recheck = set()
        for result_file in args.recheck:
            recheck |= survivor_keys(result_file)
    modules = args.only or (sorted({m for m, _ in recheck}) if recheck else list(TARGETS))
    unknown = [m for m in modules if m not in TARGETS]
    if unknown:
        parser.error(f"not in TARGETS: {', '.join(unknown)}")
    done_before: dict[str, set[str]] = {}
    for result_file in args.not_in:
        for module, keys in tried_keys(result_file).items():
            done_before.setdefault(module, set()).update(keys)

    started = time.monotonic()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fedrec-mutation-") as tmp:
        trees = [Path(tmp) / f"tree{j}" for j in range(max(1, args.jobs))]
        for tree_dir in trees:
            _snapshot(tree_dir)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
        files = {m: [f for f in TARGETS[m] if (trees[0] / f).exists()] for m in modules}
        untested = [m for m in modules if not files[m]]
        if untested:  # never let pytest fall back to the whole suite
            print(f"left out, no committed unit tests: {', '.join(untested)}", flush=True)
            modules = [m for m in modules if files[m]]
        if not modules:
            raise SystemExit("no module with committed unit tests to mutate")
        all_files = sorted({f for m in modules for f in files[m]})
        trace = _trace(trees[0], modules, all_files, timeout=max(args.test_timeout, 1800))
        print(f"traced {len(trace['durations'])} tests in {time.monotonic() - started:.0f} s",
              flush=True)  # fmt: skip
        plans: dict[str, tuple[_Plan, list[Mutant], ast.AST, int]] = {}
        gone: dict[str, list[str]] = {}  # survivors to recheck whose line has changed since
        for module in modules:
            found, tree = mutants(module, (trees[0] / module).read_text())
            total = len(found)
            if recheck is not None:
                found = [m for m in found if (module, m.key) in recheck]
                present = {m.key for m in found}
                gone[module] = sorted(k for m, k in recheck if m == module and k not in present)
            else:
                found = found[args.skip :: args.every]
            found = [m for m in found if m.key not in done_before.get(module, set())]
            plans[module] = (_plan(module, files[module], trace), found, tree, total)
        # round-robin over the modules, so a budget cut leaves every module partly covered
        lists = [plans[module][1] for module in modules]
        order = [lst[i] for i in range(max(map(len, lists), default=0)) for lst in lists if i < len(lst)]  # fmt: skip
        runners = [_Runner(tree_dir, fork=not args.no_fork) for tree_dir in trees]
        free: queue.Queue[_Runner] = queue.Queue()
        for runner in runners:
            free.put(runner)

        outcomes: list[dict] = []
        lock = threading.Lock()

        def run(mutant: Mutant) -> dict | None:
            if time.monotonic() - started > args.budget:
                return None
            runner = free.get()
            try:
                plan, _, tree, _ = plans[mutant.module]
                outcome = _run_mutant(mutant, plan, runner, tree, args.test_timeout)
            finally:
                free.put(runner)
            with lock:
                outcomes.append(outcome)
                _write(args, modules, plans, outcomes, commit, started, load_before, gone)
            print(f"{outcome['outcome']:9s} {mutant.module}:{mutant.line} {mutant.description}"
                  f"  [{outcome['stage']}, {outcome['seconds']} s] {outcome['killed_by']}",
                  flush=True)  # fmt: skip
            return outcome

        try:
            with ThreadPoolExecutor(max_workers=len(trees)) as pool:
                list(pool.map(run, order))
        finally:
            for runner in runners:
                runner.close()

    result = _write(args, modules, plans, outcomes, commit, started, load_before, gone)
    for module, r in result["modules"].items():
        print(f"{module}: {r['killed']} of {r['tried']} tried killed ({r['mutants']} planned of "
              f"{r['sites']}), {len(r['survived'])} survived")  # fmt: skip


if __name__ == "__main__":
    main()
