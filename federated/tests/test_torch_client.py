"""The PyTorch ClientApp (run config `torch-model`) keeps the tch-side client's promises, its
handlers called in-process with Flower Messages: it vets the round's global model on its first
batch before training on it (trap weights and non-finite parameters are refused, nothing
leaves but why, the refusal in the audit log), and its guard's state survives the process
(kept beside the node's audit log, checked against it; a restarted node goes on from it, a
missing one stops the node naming the file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from gradguard_federated import client_app
from gradguard_federated.task import ARRAYS_KEY, CONFIG_KEY, GUARD_KEY, METRICS_KEY, to_record
from test_refusal import POLICY

REPO = Path(__file__).resolve().parents[2]
GRADGUARD = REPO / "target" / "release" / "gradguard"
FIXTURES = REPO / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))
import malicious_models  # noqa: E402  (tests/fixtures: the models a malicious server could send)

BATCH = 32


@pytest.fixture(autouse=True)
def task_identity():
    """Messages made outside a Flower process need the identity flwr-serverapp would set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """The node's data (the first 600 digits), its policy, and the honest model's parameters."""
    out = tmp_path_factory.mktemp("torch-node")
    x, y = malicious_models.digits(600)
    (out / "data").mkdir()
    np.save(out / "data" / "x.npy", x)
    np.save(out / "data" / "y.npy", y)
    (out / "policy.toml").write_text(POLICY)
    honest = malicious_models.honest(x, y)
    return out, x, honest


def params_of(model) -> dict:
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def context(node_dir: Path, log: Path) -> Context:
    """A ClientApp's context as a new process sees it: nothing kept in memory."""
    node = {"partition-id": 0, "num-partitions": 1, "data-dir": str(node_dir / "data"), "policy": str(node_dir / "policy.toml"), "audit-log": str(log)}
    run = {"default-policy": "default.toml", "torch-model": "malicious_models:Mlp"}
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run)


def train(params: dict, ctx: Context, server_round: int = 1) -> Message:
    config = {"local-steps": 2, "lr": 0.1, "batch-size": BATCH, "seed": 0, "server-round": server_round}
    msg = Message(RecordDict({CONFIG_KEY: ConfigRecord(config), ARRAYS_KEY: to_record(params)}), dst_node_id=7, message_type=MessageType.TRAIN)
    return client_app.train(msg, ctx)


def records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def verify(log: Path) -> None:
    done = subprocess.run([str(GRADGUARD), "log", "verify", str(log)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_honest_round_is_trained_on_and_a_restarted_node_goes_on(node, tmp_path):
    node_dir, _, honest = node
    log = tmp_path / "audit.jsonl"
    first = train(params_of(honest), context(node_dir, log))
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    record = first.content.config_records[GUARD_KEY]
    assert record["status"] == "released" and record["state-origin"] == "fresh", dict(record)
    assert first.content.metric_records[METRICS_KEY]["num-examples"] > 0
    state_file = Path(str(log) + ".state.json")
    assert state_file.exists()
    # A new process (a new Context, nothing in memory): the state beside the log goes on.
    second = train(params_of(honest), context(node_dir, log), server_round=2)
    again = second.content.config_records[GUARD_KEY]
    assert again["status"] == "released", dict(again)
    assert again["state-origin"] == f"restored from {state_file} (step 1)", again["state-origin"]
    assert again["step"] == record["step"] + 1
    marks = [r for r in records(log) if r["outcome"] == "restarted"]
    assert len(marks) == 1 and str(state_file) in marks[0]["reason"]
    assert [r["step"] for r in records(log) if r["outcome"] == "state_saved"] == [1, 2]
    verify(log)


def test_trap_weights_are_refused_before_training(node, tmp_path):
    node_dir, x, honest = node
    trap = malicious_models.trap(malicious_models.Mlp(), x, BATCH)
    trap.fc1.load_state_dict(honest.fc1.state_dict())
    log = tmp_path / "audit.jsonl"
    reply = train(params_of(trap), context(node_dir, log))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert ARRAYS_KEY not in reply.content.array_records
    record = reply.content.config_records[GUARD_KEY]
    assert record["status"] == "refused", dict(record)
    assert record["reason"].startswith("refused: the global model isolates") and "in fc0" in record["reason"], record["reason"]
    fc0 = dict(json.loads(record["vetting"])["layers"])["fc0"]
    assert fc0["status"] == "measured" and fc0["exposed_fraction"] >= 0.75, fc0
    metrics = reply.content.metric_records[METRICS_KEY]
    assert metrics["refused"] == 1 and metrics["blocked"] == 1 and metrics["num-examples"] == 0
    refused = [r for r in records(log) if r["outcome"] == "refused"]
    assert len(refused) == 1 and refused[0]["reason"] == record["reason"]
    verify(log)


def test_non_finite_parameters_are_refused_by_name(node, tmp_path):
    node_dir, _, honest = node
    params = params_of(honest)
    params["fc0.weight"][0, 0] = np.nan
    reply = train(params, context(node_dir, tmp_path / "audit.jsonl"))
    record = reply.content.config_records[GUARD_KEY]
    assert record["status"] == "refused"
    assert record["reason"] == "refused: the global model's parameter fc0.weight holds 1 non-finite value(s)"


def test_a_missing_state_stops_the_node_naming_the_file(node, tmp_path):
    node_dir, _, honest = node
    log = tmp_path / "audit.jsonl"
    assert not train(params_of(honest), context(node_dir, log)).has_error()
    state_file = Path(str(log) + ".state.json")
    state_file.unlink()
    reply = train(params_of(honest), context(node_dir, log), server_round=2)
    assert reply.has_error()
    assert "StateError" in reply.error.reason and str(state_file) in reply.error.reason, reply.error.reason
    assert "gradguard log reset-state" in reply.error.reason
