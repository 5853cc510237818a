"""The guard's state survives the process: kept beside the node's audit log
(`<audit-log>.state.json`, written atomically after every release, its SHA-256 in the chained
log), a node that starts again goes on with its levels, step and ledger exactly as if it had not
stopped, and the log says so (`restarted`). A state that cannot be vouched for (missing after a
logged save, rolled back, truncated) stops the node, naming the file, until an operator resets
it with `gradguard log reset-state` (logged)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import gradguard_fl
import pytest

from byo import layer_decisions, save_mlp, write_node
from test_byo_model import config

REPO = Path(__file__).resolve().parents[2]
GRADGUARD = REPO / "target" / "release" / "gradguard"


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return str(save_mlp(tmp_path_factory.mktemp("model") / "mlp.pt"))


@pytest.fixture
def node(mlp, tmp_path):
    data = gradguard_fl.DataDir(str(write_node(tmp_path / "node", 0)))
    params = gradguard_fl.initial_parameters(model_path=mlp)
    return data, params, tmp_path / "audit.jsonl"


def records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def gradguard(*args: str) -> subprocess.CompletedProcess:
    assert GRADGUARD.exists(), f"{GRADGUARD}: build it first (cargo build --release)"
    return subprocess.run([str(GRADGUARD), *args], capture_output=True, text=True)


def test_a_restarted_node_goes_on_as_if_it_had_not_stopped(mlp, node, tmp_path):
    data, params, log = node
    first = gradguard_fl.train(params, config(mlp), data, audit_log=str(log))
    state_file = Path(str(log) + ".state.json")
    assert state_file.exists() and json.loads(state_file.read_text()) == json.loads(first.state)
    saved = [r for r in records(log) if r["outcome"] == "state_saved"]
    assert len(saved) == 1 and saved[0]["step"] == 1
    # What an uninterrupted node does next: the in-memory state handed over (another log, so
    # that the file beside it plays no part).
    other_log = tmp_path / "continuous.jsonl"
    shutil.copy(log, other_log)
    shutil.copy(state_file, str(other_log) + ".state.json")
    continuous = gradguard_fl.train(params, config(mlp, server_round=2), data, state=first.state, audit_log=str(other_log))
    # A new process: nothing in memory, only the files.
    restarted = gradguard_fl.train(params, config(mlp, server_round=2), data, audit_log=str(log))
    assert restarted.state_origin == f"restored from {state_file} (step 1)", restarted.state_origin
    assert continuous.state_origin == "restored (step 1)"
    assert restarted.step == continuous.step == 1
    # Levels, step and the M5 ledger go on exactly as without the restart.
    assert json.loads(restarted.state) == json.loads(continuous.state)
    assert json.loads(restarted.state)["ledger"]["releases"] == 2
    # Round 1 climbed fc1's ladder to 2; after the restart it stays there, no climb again.
    assert all(r["outcome"] != "escalated" for r in layer_decisions(log, "fc1", 1))
    assert {r["level"] for r in layer_decisions(log, "fc1", 1)} == {2}
    # The log marks the restart, and its chain verifies across it.
    marks = [r for r in records(log) if r["outcome"] == "restarted"]
    assert len(marks) == 1 and str(state_file) in marks[0]["reason"]
    verified = gradguard("log", "verify", str(log))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_missing_state_stops_the_node_until_an_operator_resets_it(mlp, node):
    data, params, log = node
    gradguard_fl.train(params, config(mlp), data, audit_log=str(log))
    state_file = Path(str(log) + ".state.json")
    state_file.unlink()
    # Fail closed: nothing is trained or released, every time, and the error names the file.
    for server_round in (2, 3):
        with pytest.raises(gradguard_fl.StateError, match="guard state is missing") as err:
            gradguard_fl.train(params, config(mlp, server_round=server_round), data, audit_log=str(log))
        assert str(state_file) in str(err.value) and "gradguard log reset-state" in str(err.value)
    reset = gradguard("log", "reset-state", str(log), "--reason", "state lost with the disk")
    assert reset.returncode == 0, reset.stderr
    fresh = gradguard_fl.train(params, config(mlp, server_round=4), data, audit_log=str(log))
    assert fresh.step == 0 and fresh.state_origin == "fresh"
    resets = [r for r in records(log) if r["outcome"] == "state_reset"]
    assert len(resets) == 1 and resets[0]["reason"] == "operator reset: state lost with the disk"
    assert gradguard("log", "verify", str(log)).returncode == 0


def test_a_rolled_back_state_is_refused(mlp, node, tmp_path):
    data, params, log = node
    gradguard_fl.train(params, config(mlp), data, audit_log=str(log))
    state_file = Path(str(log) + ".state.json")
    old = tmp_path / "old-state.json"
    shutil.copy(state_file, old)
    gradguard_fl.train(params, config(mlp, server_round=2), data, audit_log=str(log))
    # Rolled back to round 1's state: the ledger would forget round 2's release.
    shutil.copy(old, state_file)
    with pytest.raises(gradguard_fl.StateError, match="rolled back or altered"):
        gradguard_fl.train(params, config(mlp, server_round=3), data, audit_log=str(log))


def test_a_truncated_state_is_refused_naming_it(mlp, node):
    data, params, log = node
    gradguard_fl.train(params, config(mlp), data, audit_log=str(log))
    state_file = Path(str(log) + ".state.json")
    state_file.write_bytes(state_file.read_bytes()[:40])
    with pytest.raises(gradguard_fl.StateError) as err:
        gradguard_fl.train(params, config(mlp, server_round=2), data, audit_log=str(log))
    assert str(state_file) in str(err.value)


def test_a_state_the_log_never_recorded_is_refused(mlp, node, tmp_path):
    data, params, log = node
    gradguard_fl.train(params, config(mlp), data, audit_log=str(log))
    # The log deleted (or replaced) while the state stays: the two no longer vouch for each other.
    log.unlink()
    with pytest.raises(gradguard_fl.StateError, match="does not record"):
        gradguard_fl.train(params, config(mlp, server_round=2), data, audit_log=str(log))


def test_a_node_at_its_ledger_cap_stays_there_after_a_restart(mlp, node, tmp_path):
    # The shipped federated policy with a cap of 0.015 bits: round 1's release (fc2 noised to
    # 0.01 bits/dim) fits, round 2's would not, so from then on every layer is withheld.
    policy = tmp_path / "capped.toml"
    text = (REPO / "federated" / "gradguard_federated" / "policies" / "default.toml").read_text()
    assert "ledger_cap_bits = 1.0" in text
    policy.write_text(text.replace("ledger_cap_bits = 1.0", "ledger_cap_bits = 0.015"))
    data, params, log = node
    capped = lambda r: config(mlp, server_round=r, **{"policy-path": str(policy)})  # noqa: E731
    first = gradguard_fl.train(params, capped(1), data, audit_log=str(log))
    assert first.released_layers == ["fc2"], (first.released_layers, first.withheld_layers)
    second = gradguard_fl.train(params, capped(2), data, state=first.state, audit_log=str(log))
    assert second.released_layers == [] and sorted(second.withheld_layers) == ["fc1", "fc2"]
    # A crash and a restart: nothing in memory. The cap still holds.
    after = gradguard_fl.train(params, capped(3), data, audit_log=str(log))
    assert after.state_origin.startswith("restored from") and after.released_layers == [], after.released_layers
    # Without the file (what a restart did before): the cap would be evaded.
    fresh = gradguard_fl.train(params, capped(3), data)
    assert fresh.released_layers == ["fc2"]
