"""The server verifies before it aggregates (verify.py), on replies made by the real guard:
only a manifest of a required policy, showing that policy's rules and releasing exactly the
arrays present, reaches the average; everything else is rejected with its reason and counted."""

from __future__ import annotations

import json
from pathlib import Path

import gradguard_fl
import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from gradguard_federated.server_app import GuardedFedAvg, Recorder, ServerMetrics, ServerSettings
from gradguard_federated.task import ARRAYS_KEY, GUARD_KEY, METRICS_KEY, to_record
from gradguard_federated.verify import RequiredPolicies
from test_server_aggregation import settings, task_identity  # noqa: F401 - the fixture

PERMISSIVE = Path(__file__).resolve().parent / "policies" / "permissive.toml"


def released(global_params, policy_path, partition):
    cfg = {"local-steps": 3, "lr": 0.1, "batch-size": 32, "seed": 0, "server-round": 1, "policy-path": str(policy_path)}
    return gradguard_fl.train(global_params, cfg, gradguard_fl.Partition(partition, 3))


def reply(node, result, partition, *, arrays=None, manifest=None, stated_hash=None, drop_manifest=False):
    instruction = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    guard = {"status": "blocked" if result.blocked else "released", "manifest": manifest or result.manifest,
             "policy-hash": stated_hash or result.policy_hash, "partition-id": partition, "report": result.shared_report}
    records = {METRICS_KEY: MetricRecord({"num-examples": result.num_examples})}
    if not drop_manifest:
        records[GUARD_KEY] = ConfigRecord(guard)
    records[ARRAYS_KEY] = to_record(arrays if arrays is not None else result.update)
    return Message(RecordDict(records), reply_to=instruction)


def test_only_manifests_of_the_required_policy_are_aggregated(global_params, policy_paths):
    required = RequiredPolicies.parse("default.toml")
    s = GuardedFedAvg(settings(min_cohort=1, required=required), Recorder(None), ServerMetrics(0))
    s.global_params = {k: v.copy() for k, v in global_params.items()}
    s.sent[1] = [1, 2, 3, 4, 5]
    honest = released(global_params, policy_paths["default"], 0)
    assert not honest.blocked and honest.policy_hash in required.rules
    # A node whose guard ran another policy (here: a permissive one, everything raw).
    permissive = PERMISSIVE
    raw = released(global_params, permissive, 1)
    assert raw.policy_hash not in required.rules and raw.withheld_layers == []
    # The same raw release with its manifest's hash rewritten to the required one.
    forged = json.loads(raw.manifest)
    forged["policy_hash"] = honest.policy_hash
    # A reply with arrays and no manifest at all (the guard bypassed).
    replies = [
        reply(1, honest, 0),
        reply(2, raw, 1),
        reply(3, raw, 2, manifest=json.dumps(forged), stated_hash=honest.policy_hash),
        reply(4, raw, 3, drop_manifest=True),
        reply(5, raw, 4, arrays={**raw.update, "fc2.bias": np.full(10, np.nan, np.float32)}, manifest=json.dumps(forged), stated_hash=honest.policy_hash),
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None and metrics["compliant-updates"] == 1
    rows = {r.node_id: r for r in s.rows[1]["rows"]}
    assert rows[1].status == "released"
    assert [rows[n].reject for n in (2, 3, 4, 5)] == ["policy-mismatch", "forged-manifest", "no-manifest", "forged-manifest"]
    assert "shows no check of its rules" in rows[3].reason
    text = s.metrics.render().decode()
    assert 'gradguard_server_rejected_total{reason="policy-mismatch"} 1.0' in text
    assert 'gradguard_server_rejected_total{reason="forged-manifest"} 2.0' in text
    assert 'gradguard_server_rejected_total{reason="no-manifest"} 1.0' in text
    # Only the honest update moved the model.
    assert s.rows[1]["contributors"]["fc2"] == ["p0"]


def test_a_stated_hash_other_than_the_manifests_is_rejected(global_params, policy_paths):
    s = GuardedFedAvg(settings(min_cohort=1), Recorder(None), ServerMetrics(0))
    s.global_params = {k: v.copy() for k, v in global_params.items()}
    s.sent[1] = [1]
    honest = released(global_params, policy_paths["default"], 0)
    s.aggregate_train(1, [reply(1, honest, 0, stated_hash="0" * 64)])
    assert s.rows[1]["rows"][0].reject == "forged-manifest"


def test_required_policy_accepts_hashes_and_files(policy_paths):
    text = policy_paths["default"].read_text()
    h = gradguard_fl.check_policy(text)["hash"]
    both = RequiredPolicies.parse(f"{'a' * 64}, default.toml")
    assert set(both.rules) == {"a" * 64, h}
    assert both.rules["a" * 64] is None and both.rules[h]


def test_an_unset_required_policy_fails_closed_to_the_runs_default_policy(global_params, policy_paths):
    from gradguard_federated.server_app import required_policies

    # Unset: the run's default policy, so a node that enforces another one is not aggregated.
    default = RequiredPolicies.parse(required_policies({"default-policy": "default.toml"}))
    assert released(global_params, policy_paths["default"], 0).policy_hash in default.rules
    assert released(global_params, PERMISSIVE, 1).policy_hash not in default.rules
    assert required_policies({}) == "default.toml"
    # `any` is the explicit opt-out; a list is taken as given.
    assert RequiredPolicies.parse(required_policies({"required-policy": "any"})).rules == {}
    assert required_policies({"required-policy": "a.toml b.toml"}) == "a.toml b.toml"
