"""A process that imports fedrec sends no usage telemetry: the libraries' own checks say so."""

import json
import os
import subprocess
import sys

from prefect._internal.analytics.ci_detection import CI_ENV_VARS

PROBE = """
import json, sys
if sys.argv[1] == "fedrec":
    import fedrec
from mlflow.telemetry.utils import is_telemetry_disabled
from prefect._internal.analytics.enabled import is_telemetry_enabled
print(json.dumps({"mlflow_disabled": is_telemetry_disabled(),
                  "prefect_enabled": is_telemetry_enabled()}))
"""


def _probe(first: str, **env: str) -> dict:
    # without the markers of CI and of a pytest run, which turn telemetry off by themselves
    dropped = {"DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "PYTEST_CURRENT_TEST", *CI_ENV_VARS}
    clean = {k: v for k, v in os.environ.items() if k not in dropped}
    out = subprocess.run([sys.executable, "-c", PROBE, first], env=clean | env,
                         capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_fedrec_turns_mlflow_and_prefect_telemetry_off():
    # the control: the same process without fedrec would report usage
    assert _probe("mlflow") == {"mlflow_disabled": False, "prefect_enabled": True}
    assert _probe("fedrec") == {"mlflow_disabled": True, "prefect_enabled": False}


def test_a_users_own_setting_wins():
    allowed = _probe("fedrec", DO_NOT_TRACK="false", MLFLOW_DISABLE_TELEMETRY="false")
    assert allowed == {"mlflow_disabled": False, "prefect_enabled": True}
