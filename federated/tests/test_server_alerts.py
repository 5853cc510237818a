"""The federated server's alert rules (federated/prometheus/alerts.yml) pass promtool: the rule
file checks, and its unit tests (alerts_test.yml) fire the refusal alert when a node refuses a
global model and stay silent otherwise. promtool comes from scripts/install-test-deps.sh."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

RULES = Path(__file__).resolve().parents[1] / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    assert tool, "promtool is not on PATH (scripts/install-test-deps.sh installs it)"
    return subprocess.run([tool, *args], cwd=RULES, capture_output=True, text=True)


def test_the_rules_check_and_their_unit_tests_pass():
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_the_refusal_metric_the_alert_reads_is_the_servers():
    from gradguard_federated.server_records import ServerMetrics

    metrics = ServerMetrics(0)
    metrics.refusals.labels("isolation").inc()
    assert 'gradguard_fl_refusals_total{reason="isolation"} 1.0' in metrics.render().decode()
    assert "gradguard_fl_refusals_total" in (RULES / "alerts.yml").read_text()
