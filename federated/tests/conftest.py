"""Shared fixtures of the federated tests (run by `make test` through scripts/federated-setup.sh).

Nothing here skips: a missing flwr, gradguard_fl or Flower executable is an error.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Flower's telemetry and update check call a Flower server: off, for this process and every
# process the tests start (only loopback traffic).
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"

# A temporary folder of this test session's own, for this process and every process it starts:
# a node's default spool (its audit log and the guard state kept beside it) lives under TMPDIR,
# and a state left there by an earlier session must not meet this one's (short: Ray's sockets).
SESSION_TMP = tempfile.mkdtemp(prefix="gg-t-")
os.environ["TMPDIR"] = SESSION_TMP
tempfile.tempdir = SESSION_TMP

APP_DIR = Path(__file__).resolve().parents[1]
POLICIES = APP_DIR / "gradguard_federated" / "policies"

# The app package is imported directly by the handler tests (Flower adds the FAB's folder to
# sys.path the same way when it loads the ClientApp).
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))


@pytest.fixture(scope="session")
def policy_paths() -> dict[str, Path]:
    return {p.stem: p for p in POLICIES.glob("*.toml")}


@pytest.fixture(scope="session")
def global_params():
    import gradguard_fl

    return gradguard_fl.initial_parameters(0)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_TMP, ignore_errors=True)
