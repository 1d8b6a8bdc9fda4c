"""fedrec.runtime.foreground_flow: flow runs in the block have no heartbeat thread to wait for at
their end, unless the user set a heartbeat."""

import os
import subprocess
import sys

from prefect.settings import get_current_settings

from fedrec.runtime import _HEARTBEAT_ENV, foreground_flow

PROBE = """
from prefect.settings import get_current_settings
from fedrec.runtime import foreground_flow
with foreground_flow():
    print(get_current_settings().flows.heartbeat_frequency)
"""


def test_the_block_has_no_heartbeat_and_the_setting_comes_back(monkeypatch):
    for name in _HEARTBEAT_ENV:
        monkeypatch.delenv(name, raising=False)
    before = get_current_settings().flows.heartbeat_frequency
    assert before is not None  # Prefect's default: a heartbeat every 180 s
    with foreground_flow():
        assert get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency == before


def test_a_users_heartbeat_wins():
    env = {k: v for k, v in os.environ.items() if k not in _HEARTBEAT_ENV}
    env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = "45"
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True, timeout=120)  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "45"
