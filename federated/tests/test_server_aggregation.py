"""The ServerApp's aggregation on crafted replies: only compliant releases are averaged, per
layer, and only when the cohort floor is met."""

from __future__ import annotations

import json

import gradguard_fl
import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from gradguard_federated.server_app import GuardedFedAvg, Recorder, ServerMetrics, ServerSettings
from gradguard_federated.task import ARRAYS_KEY, GUARD_KEY, METRICS_KEY, to_numpy, to_record

LAYERS = ("conv1", "conv2", "fc1", "fc2")


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def settings(**overrides) -> ServerSettings:
    base = dict(num_rounds=1, local_steps=10, lr=0.1, batch_size=32, seed=0, min_cohort=2, min_layer_cohort=1,
                min_nodes=1, connect_timeout=0.0, round_timeout=5.0, fraction_evaluate=0.0, metrics_port=0, out_dir=None)
    return ServerSettings(**{**base, **overrides})


def strategy(global_params, **overrides) -> GuardedFedAvg:
    s = GuardedFedAvg(settings(**overrides), Recorder(None), ServerMetrics(0))
    s.global_params = {k: v.copy() for k, v in global_params.items()}
    return s


def manifest(released, outcome="released"):
    return json.dumps({"outcome": {"outcome": outcome}, "policy_hash": "x", "step": 0,
                       "layers": [{"name": l, "released": l in released, "actions": [] if l in released else ["withhold"], "checks": []} for l in LAYERS]})


def reply(node, partition, arrays=None, released=LAYERS, status="released", n=100, outcome="released"):
    instruction = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    guard = {"status": status, "manifest": manifest(released, outcome), "partition-id": partition, "policy-hash": "x"}
    records = {METRICS_KEY: MetricRecord({"num-examples": n, "blocked": int(status == "blocked")}), GUARD_KEY: ConfigRecord(guard)}
    if arrays is not None:
        records[ARRAYS_KEY] = to_record(arrays)
    return Message(RecordDict(records), reply_to=instruction)


def update(global_params, value, layers=LAYERS):
    return {k: np.full_like(v, value) for k, v in global_params.items() if gradguard_fl.layer_of(k) in layers}


def test_layers_are_averaged_over_the_clients_that_released_them(global_params):
    s = strategy(global_params)
    s.sent[1] = [1, 2, 3, 4, 5]
    replies = [
        reply(1, 0, update(global_params, 1.0), n=100),
        reply(2, 1, update(global_params, 4.0, LAYERS[1:]), released=LAYERS[1:], n=300),
        # Claims conv1 is withheld but sends it: rejected whole.
        reply(3, 2, update(global_params, 100.0), released=LAYERS[1:]),
        # Blocked, yet carries arrays: rejected, nothing of it aggregated.
        reply(4, 3, update(global_params, 100.0), status="blocked", outcome="blocked", released=()),
        # Wrong shape.
        reply(5, 4, {**update(global_params, 100.0), "fc2.bias": np.zeros(3, np.float32)}),
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    assert metrics["compliant-updates"] == 2 and metrics["aggregated"] == 1
    new = to_numpy(arrays)
    step = 0.1 * 10
    for name, before in global_params.items():
        expected = 1.0 if name.startswith("conv1.") else (100 * 1.0 + 300 * 4.0) / 400
        np.testing.assert_allclose(new[name], before - step * expected, rtol=1e-6, atol=1e-6)
    rows = {r.partition: r for r in s.rows[1]["rows"]}
    assert rows["p2"].status == "rejected" and "the manifest does not release conv1" in rows["p2"].reason
    assert rows["p3"].status == "rejected" and "blocked reply carried arrays" in rows["p3"].reason
    assert rows["p4"].status == "rejected" and "fc2.bias has shape (3,)" in rows["p4"].reason
    assert [rows[p].reject for p in ("p2", "p3", "p4")] == ["withheld-layer-present", "blocked-with-arrays", "shape"]
    text = s.metrics.render().decode()
    for reason in ("withheld-layer-present", "blocked-with-arrays", "shape"):
        assert f'gradguard_server_rejected_total{{reason="{reason}"}} 1.0' in text
    assert s.rows[1]["contributors"]["conv1"] == ["p0"]


def test_cohort_floor_stops_the_update(global_params):
    s = strategy(global_params, min_cohort=2)
    s.sent[1] = [1, 2]
    arrays, metrics = s.aggregate_train(1, [reply(1, 0, update(global_params, 1.0))])
    assert arrays is None and metrics["aggregated"] == 0
    state = s.rows[1]
    assert "cohort floor not met: 1 compliant update(s) < min-cohort 2" in state["reason"]
    assert [r.status for r in state["rows"]] == ["released", "no reply"]


def test_layer_released_by_too_few_keeps_its_value(global_params):
    s = strategy(global_params, min_layer_cohort=2)
    s.sent[1] = [1, 2]
    replies = [reply(1, 0, update(global_params, 1.0)), reply(2, 1, update(global_params, 1.0, LAYERS[1:]), released=LAYERS[1:])]
    new = to_numpy(s.aggregate_train(1, replies)[0])
    for name in ("conv1.weight", "conv1.bias"):
        np.testing.assert_array_equal(new[name], global_params[name])
    assert not np.array_equal(new["fc1.weight"], global_params["fc1.weight"])
    assert s.rows[1]["contributors"]["conv1"] == []


def test_malformed_reply_is_rejected_not_fatal(global_params):
    s = strategy(global_params, min_cohort=1)
    s.sent[1] = [1, 2]
    bad = reply(2, 1, update(global_params, 1.0))
    bad.content.config_records[GUARD_KEY]["manifest"] = json.dumps({"outcome": {"outcome": "released"}, "layers": [42]})
    arrays, _ = s.aggregate_train(1, [reply(1, 0, update(global_params, 1.0)), bad])
    assert arrays is not None
    assert [r.status for r in s.rows[1]["rows"]] == ["released", "rejected"]
