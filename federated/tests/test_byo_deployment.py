"""A real SuperLink and three SuperNodes (loopback, insecure) train the user's own model: a
TorchScript MLP the test saves with the venv's torch, on per-node .npy folders the test writes.
The server starts from the file's parameters and aggregates only manifests of the required
policies; one node's policy withholds fc1, and its guard remembers across rounds (the levels
it reached in round 1 are in force at the start of round 2, from its audit log)."""

from __future__ import annotations

import json

import gradguard_fl

from byo import assert_rounds_released_with_fc1_withheld_on_p2, CHANCE, POLICIES, layer_decisions, save_mlp, write_node
from test_deployment import Deployment, deployment, rounds  # noqa: F401 - the fixture

# Chance is 0.25 on the balanced held-out data; three rounds of 20 local steps reach about
# 0.8 here (the initial model about chance). The margin the test asks for above chance:
MARGIN = 0.35


def fc1_records(log_path, step):
    return layer_decisions(log_path, "fc1", step)


def test_torchscript_model_on_own_data_three_nodes(deployment: Deployment, tmp_path):
    d = deployment
    model = save_mlp(tmp_path / "mlp.pt")
    audit = tmp_path / "audit-p2.jsonl"
    d.start_superlink()
    policies = ["mlp-observe.toml", "mlp-observe.toml", "mlp-tight.toml"]
    for p in range(3):
        folder = write_node(tmp_path / f"data-p{p}", p, test_files=(p == 1))
        node = {"partition-id": p, "num-partitions": 3, "data-dir": str(folder), "policy": str(POLICIES / policies[p])}
        if p == 2:
            node["audit-log"] = str(audit)
        d.start_supernode(f"node-p{p}", node)
    required = f"{POLICIES / 'mlp-observe.toml'} {POLICIES / 'mlp-tight.toml'}"
    d.run({"num-server-rounds": 3, "min-cohort": 2, "min-nodes": 3, "round-timeout": 120.0, "local-steps": 20,
           "lr": 0.1, "model-path": str(model), "required-policy": required})
    d.wait_for("the end of the run", lambda evs: any(e["event"] == "run-end" for e in evs), timeout=420)

    per_round = rounds(d)
    assert sorted(per_round) == [0, 1, 2, 3]
    assert_rounds_released_with_fc1_withheld_on_p2(per_round, range(1, 4))
    # Held-out accuracy of the aggregated model, on the nodes' own held-out shares.
    accuracy = per_round[3]["federated_accuracy"]
    assert accuracy >= CHANCE + MARGIN, per_round[3]
    # ...where the file's initial parameters score about chance.
    initial = gradguard_fl.initial_parameters(model_path=str(model))
    start = gradguard_fl.evaluate(initial, gradguard_fl.DataDir(str(tmp_path / "data-p1")), model_path=str(model))
    assert start["accuracy"] < CHANCE + 0.2 < accuracy, (start, accuracy)
    assert set(per_round[3]["client_accuracy"]) == {"p0", "p1", "p2"}

    # Hysteresis across rounds, from p2's decision records: round 1 (step 0) climbed fc1's
    # ladder to withhold (level 2); round 2 (step 1) started there: no escalation, level 2.
    round1, round2 = fc1_records(audit, 0), fc1_records(audit, 1)
    assert [r["level"] for r in round1 if r["outcome"] == "escalated"] == [1, 2]
    assert round2 and all(r["outcome"] != "escalated" for r in round2)
    assert {r["level"] for r in round2} == {2} and {r["outcome"] for r in round2} == {"withheld"}
    # Node metrics without a sidecar: the server's per-node series from the verified manifests,
    # under the exporter's names.
    prom = (d.out / "metrics.prom").read_text()
    assert 'gradguard_layer_withheld{layer="fc1",node="p2"} 1.0' in prom
    assert 'gradguard_layer_withheld{layer="fc1",node="p0"} 0.0' in prom
    assert 'gradguard_layer_protection_level{layer="fc1",node="p2"} 2.0' in prom
    assert 'gradguard_releases_total{node="p2",outcome="protected"} 3.0' in prom
    assert 'gradguard_report_step{node="p1"} 2.0' in prom
    assert 'gradguard_layer_leakage{layer="fc2",metric="sensitivity_rms",node="p0"}' in prom
    print("\n" + (d.out / "rounds.txt").read_text())
