"""The ClientApp's handlers called in-process with Flower Messages: the reply layout of released,
withheld and blocked updates, and clear error replies on bad input after which the same client
keeps serving later rounds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from gradguard_federated import client_app
from gradguard_federated.task import ARRAYS_KEY, CONFIG_KEY, GUARD_KEY, METRICS_KEY, to_record

RUN_CONFIG = {"default-policy": "default.toml"}


@pytest.fixture(autouse=True)
def task_identity():
    """Messages made outside a Flower process need the identity flwr-serverapp would set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def context(**node_config) -> Context:
    node = {"partition-id": 0, "num-partitions": 3, **node_config}
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=dict(RUN_CONFIG))


def message(params, config=None, kind=MessageType.TRAIN, arrays=True) -> Message:
    records = {CONFIG_KEY: ConfigRecord(config if config is not None else {"local-steps": 10, "lr": 0.1, "batch-size": 32, "server-round": 1})}
    if arrays:
        records[ARRAYS_KEY] = to_record(params)
    return Message(RecordDict(records), dst_node_id=7, message_type=kind)


def test_released_reply_carries_arrays_manifest_and_metrics(global_params):
    reply = client_app.train(message(global_params), context())
    assert not reply.has_error()
    content = reply.content
    assert set(content.array_records[ARRAYS_KEY].keys()) == set(global_params)
    guard = content.config_records[GUARD_KEY]
    assert guard["status"] == "released" and guard["partition-id"] == 0
    assert json.loads(guard["manifest"])["outcome"] == {"outcome": "released"}
    assert json.loads(guard["report"])["layers"][0]["name"] == "conv1"
    metrics = content.metric_records[METRICS_KEY]
    assert metrics["blocked"] == 0 and metrics["num-examples"] > 0


def test_withheld_layer_is_absent_from_the_reply(global_params):
    reply = client_app.train(message(global_params), context(**{"policy": "tight-first-layer.toml", "partition-id": 1}))
    names = set(reply.content.array_records[ARRAYS_KEY].keys())
    assert names == {n for n in global_params if not n.startswith("conv1.")}
    manifest = json.loads(reply.content.config_records[GUARD_KEY]["manifest"])
    assert manifest["layers"][0] == {**manifest["layers"][0], "name": "conv1", "released": False, "actions": ["withhold"]}


def test_blocked_reply_carries_no_arrays_and_no_report(global_params):
    reply = client_app.train(message(global_params), context(**{"policy": "impossible.toml", "partition-id": 2}))
    assert not reply.has_error()
    content = reply.content
    assert len(content.array_records) == 0
    guard = content.config_records[GUARD_KEY]
    assert guard["status"] == "blocked" and "above threshold 0" in guard["reason"]
    assert "report" not in guard
    assert content.metric_records[METRICS_KEY]["blocked"] == 1


def test_server_cannot_set_the_clients_policy(global_params):
    reply = client_app.train(message(global_params, {"local-steps": 5, "policy": "version = 1\n"}), context())
    assert reply.has_error() and "cannot set a client's privacy policy" in reply.error.reason


@pytest.mark.parametrize(
    "make, node, expected",
    [
        (lambda p: message({k: v for k, v in p.items() if k != "fc2.weight"}), {}, "ParameterError: the parameters do not match the local model: missing parameter fc2.weight"),
        (lambda p: message({**p, "conv1.weight": np.zeros((8, 1, 5, 5), np.float32)}), {}, "conv1.weight has shape [8, 1, 5, 5], the local model [8, 1, 3, 3]"),
        (lambda p: message({**p, "head.weight": np.zeros(3, np.float32)}), {}, 'unknown parameter "head.weight"'),
        (lambda p: message(p, {"local-steps": 5, "momentum": 0.9}), {}, 'ConfigError: unknown config key "momentum"'),
        (lambda p: message(p, {"local-steps": -5}), {}, "config local-steps: must be in 1..=100000, got -5"),
        (lambda p: message(p, {"lr": "0.1"}), {}, "config lr: must be a number, got a string"),
        (lambda p: message(p, arrays=False), {}, "BadMessage: the message carries no ArrayRecord 'arrays'"),
        (lambda p: message(p), {"num-partitions": 100_000, "partition-id": 10}, "DataError: partition 10 of 100000 holds no training samples"),
        (lambda p: message(p), {"partition-id": 3}, "NodeConfigError: node config partition-id must be in 0..2, got 3"),
        (lambda p: message(p), {"policy": "missing.toml"}, "NodeConfigError: policy 'missing.toml': no such file"),
    ],
    ids=["missing-param", "wrong-shape", "unknown-param", "unknown-key", "bad-steps", "string-lr", "no-arrays", "empty-partition", "bad-partition", "no-policy-file"],
)
def test_bad_input_gets_a_clear_error_reply_and_the_client_keeps_serving(global_params, make, node, expected):
    ctx = context(**node)
    reply = client_app.train(make(global_params), ctx)
    assert reply.has_error()
    assert expected in reply.error.reason, reply.error.reason
    # The next round, with good input, is served normally.
    good = client_app.train(message(global_params, {"local-steps": 5, "server-round": 2}), context())
    assert not good.has_error() and good.content.config_records[GUARD_KEY]["status"] == "released"


def test_evaluate_reports_accuracy_on_the_clients_held_out_shard(global_params):
    reply = client_app.evaluate(message(global_params, {}, kind=MessageType.EVALUATE), context(**{"partition-id": 2}))
    metrics = reply.content.metric_records[METRICS_KEY]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num-examples"] > 50 and metrics["partition-id"] == 2
    bad = client_app.evaluate(message({}, {}, kind=MessageType.EVALUATE), context())
    assert bad.has_error() and "missing parameter" in bad.error.reason


def test_array_record_round_trip(global_params):
    record = to_record(global_params)
    assert isinstance(record, ArrayRecord)
    for name, array in record.items():
        np.testing.assert_array_equal(array.numpy(), global_params[name])


def test_own_model_and_data_errors_name_the_file_and_the_node_keeps_its_state(tmp_path):
    """With the run's TorchScript model and the node's data folder: a broken x.npy is an error
    reply naming the file; once fixed, the node serves, and its guard state is in Context.state,
    going on from round to round."""
    from byo import POLICIES, save_mlp, write_node

    import gradguard_fl

    model = str(save_mlp(tmp_path / "mlp.pt"))
    folder = write_node(tmp_path / "data", 0)
    good_x = np.load(folder / "x.npy")
    np.save(folder / "x.npy", good_x[:, :5])
    ctx = Context(run_id=1, node_id=8, state=RecordDict(),
                  node_config={"data-dir": str(folder), "policy": str(POLICIES / "mlp-tight.toml"), "audit-log": str(tmp_path / "audit.jsonl")},
                  run_config={"default-policy": "default.toml", "model-path": model, "loss": "cross-entropy"})
    params = gradguard_fl.initial_parameters(model_path=model)
    reply = client_app.train(message(params), ctx)
    assert reply.has_error() and "ModelError" in reply.error.reason and str(folder / "x.npy") in reply.error.reason
    assert "gradguard-guard" not in ctx.state.config_records
    np.save(folder / "x.npy", good_x)
    for r in (1, 2):
        config = {"local-steps": 10, "lr": 0.1, "batch-size": 32, "server-round": r}
        reply = client_app.train(message(params, config), ctx)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        guard = reply.content.config_records[GUARD_KEY]
        assert guard["step"] == r - 1 and guard["state-origin"] == ("fresh" if r == 1 else "restored (step 1)")
        assert json.loads(ctx.state.config_records["gradguard-guard"]["state"])["step"] == r
    scores = client_app.evaluate(message(params, kind=MessageType.EVALUATE), ctx)
    assert 0.0 <= scores.content.metric_records[METRICS_KEY]["accuracy"] <= 1.0
