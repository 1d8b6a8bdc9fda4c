"""fedrec: the command line and process-level setup around the core (``models``) and the flows."""

import os

# Prefect reads its settings once, when it is first imported. A process that imports fedrec first
# (the CLI, the benchmarks) and still falls back to Prefect's temporary API server gets a start-up
# limit that a busy machine can meet (Prefect's own is 20 s). A value set by the user wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
