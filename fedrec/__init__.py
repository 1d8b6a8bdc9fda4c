"""fedrec: the command line and process-level setup around the core (``models``) and the flows."""

import os

# Prefect reads its settings once, when it is first imported. A process that imports fedrec first
# (the CLI, the benchmarks) and still falls back to Prefect's temporary API server gets a start-up
# limit that a busy machine can meet (Prefect's own is 20 s). A value set by the user wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")

# No usage telemetry leaves a fedrec process or the servers it starts: MLflow 3 and Prefect 3 both
# report usage to their vendors by default, and both honour DO_NOT_TRACK (MLflow only its "true"
# spelling). A value set by the user wins.
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# The tracking store a command finds by default, as the user's environment named it (read again
# when a command starts, fedrec.cli.main): MLflow's set_tracking_uri writes MLFLOW_TRACKING_URI
# into this process's environment, so a run's own store would otherwise look like the default
# one (see fedrec.model_store.resume_command).
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or None
