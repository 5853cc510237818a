"""A node refuses a malicious global model before anything is computed for release: trap weights
(M6: its units each carry one sample), fishing and an imprint layer (the analytic attacks on the
node's own first batch), and non-finite parameters, made by tests/fixtures/malicious_models.py
with the venv's torch. The honest model is trained on as before. Then a real SuperLink and three
SuperNodes: honest rounds, a round where the server sends trap weights (every node refuses,
the server records why), and an honest round again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import gradguard_fl

from test_deployment import Deployment, deployment, rounds  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[2]

# M6 on every layer, both numbers: a unit that carries one sample alone gives it back
# (exposed_fraction counts the samples so exposed; isolated_share is the share of the layer's
# gradient in such units), and the analytic attacks on the node's first batch: more than 10% of
# it recovered refuses the model. Measured on this node's first batch of 32 (honest models
# trained from seeds 0-9): honest exposes at most 0.062 of it in any layer, isolated_share at
# most 0.037, and the attacks recover 0-2 samples; trap weights expose 0.875-0.969 in fc0;
# fishing on a batch holding one sample of the fished class (fishing-data): exposed_fraction
# 0.062-0.125 (the fished sample, and units whose tiny gradients rounding leaves to one other)
# but isolated_share 1.000 in fc0 and fc1 on every seed, the honest model 0.000 on that batch;
# the imprint layer exposes 0.031 (M6 misses it: its units are shared) while the differences
# attack recovers 23-30 of 32.
POLICY = """
version = 2
[settings]
estimate_every = 1
[settings.vetting]
max_recovered_fraction = 0.1
[[rule]]
name = "isolation"
metric = "exposed_fraction"
layers = ["fc0", "fc1"]
act_above = 0.1
relax_below = 0.05
ladder = [{ action = "withhold" }]
[[rule]]
name = "concentration"
metric = "isolated_share"
layers = ["fc0", "fc1"]
act_above = 0.5
relax_below = 0.25
ladder = [{ action = "withhold" }]
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("malicious")
    subprocess.run([sys.executable, str(REPO / "tests" / "fixtures" / "malicious_models.py"), str(out)], check=True)
    (out / "policy.toml").write_text(POLICY)
    return out


def config(models: Path, server_round: int = 1) -> dict:
    return {"local-steps": 2, "lr": 0.1, "batch-size": 32, "seed": 0, "server-round": server_round,
            "policy-path": str(models / "policy.toml"), "model-path": str(models / "honest.pt"), "loss": "cross-entropy"}


def round_on(models: Path, sent: str, audit_log: Path | None = None, data: str = "data"):
    params = gradguard_fl.initial_parameters(model_path=str(models / f"{sent}.pt"))
    data = gradguard_fl.DataDir(str(models / data))
    return gradguard_fl.train(params, config(models), data, audit_log=str(audit_log) if audit_log else None)


def test_the_honest_model_is_trained_on(models):
    result = round_on(models, "honest")
    assert not result.refused and not result.blocked, result.reason
    vetting = json.loads(result.vetting)
    assert vetting["non_finite"] == [] and all(c["passed"] for c in vetting["checks"])
    fc0 = next(a for a in vetting["attacks"] if a["layer"] == "fc0")
    assert fc0["recovered_fraction"] <= 0.1, fc0


def test_trap_weights_are_refused_by_sample_isolation(models, tmp_path):
    log = tmp_path / "audit.jsonl"
    result = round_on(models, "trap", log)
    assert result.refused and result.blocked and result.update == {} and result.num_examples == 0
    assert result.reason.startswith("refused: the global model isolates") and "in fc0" in result.reason, result.reason
    vetting = json.loads(result.vetting)
    fc0 = dict(vetting["layers"])["fc0"]
    assert fc0["status"] == "measured" and fc0["exposed_fraction"] >= 0.75, fc0
    # The attack agrees with M6: the node's own samples come back from fc0's release.
    attack = next(a for a in vetting["attacks"] if a["layer"] == "fc0")
    assert attack["attack"] == "analytic" and attack["samples_recovered"] >= 24, attack
    # The node's audit log records the refusal, with the same words.
    records = [json.loads(line) for line in log.read_text().splitlines()]
    refused = [r for r in records if r["outcome"] == "refused"]
    assert len(refused) == 1 and refused[0]["reason"] == result.reason


def test_an_imprint_layer_that_m6_misses_is_refused_by_the_differences_attack(models):
    result = round_on(models, "imprint")
    assert result.refused, (result.reason, result.vetting)
    assert result.reason.startswith("refused: the analytic differences attack recovers"), result.reason
    fc0 = dict(json.loads(result.vetting)["layers"])["fc0"]
    assert fc0["exposed_fraction"] <= 0.1, fc0


def test_fishing_is_refused_by_the_share_of_the_gradient_one_sample_holds(models):
    # The node's batch holds one sample of the fished class: at the fishing parameters its
    # gradient is the whole release, in both layers.
    result = round_on(models, "fishing", data="fishing-data")
    assert result.refused and result.blocked and result.update == {}, (result.reason, result.vetting)
    assert result.reason.startswith("refused: the global model isolates"), result.reason
    vetting = json.loads(result.vetting)
    failed = {(c["rule"], c["layer"]) for c in vetting["checks"] if not c["passed"]}
    assert {("concentration", "fc0"), ("concentration", "fc1")} <= failed, vetting["checks"]
    for layer in ("fc0", "fc1"):
        m6 = dict(vetting["layers"])[layer]
        assert m6["isolated_share"] >= 0.99, (layer, m6)
    # exposed_fraction counts samples: one of 32 is not much, which is why the rule reads both.
    assert vetting["n"] == 32 and 1 <= len(vetting["exposed_samples"]) <= 4, vetting["exposed_samples"]
    # The attack agrees: the fished sample comes back from fc0.
    attack = next(a for a in vetting["attacks"] if a["layer"] == "fc0")
    assert attack["samples_recovered"] >= 1, attack


def test_the_honest_model_is_trained_on_the_batch_fishing_isolates(models):
    result = round_on(models, "honest", data="fishing-data")
    assert not result.refused and not result.blocked, (result.reason, result.vetting)


def test_non_finite_parameters_are_refused_by_name(models):
    result = round_on(models, "nonfinite")
    assert result.refused
    assert result.reason == "refused: the global model's parameter fc0.weight holds 1 non-finite value(s)"


def test_a_deployment_refuses_a_malicious_round_and_resumes(deployment: Deployment, models):  # noqa: F811
    d = deployment
    d.start_superlink()
    for p in range(3):
        node = {"partition-id": p, "num-partitions": 3, "data-dir": str(models / "data"), "policy": str(models / "policy.toml"),
                "audit-log": str(d.out / f"audit-p{p}.jsonl")}
        d.start_supernode(f"node-p{p}", node)
    d.run({"num-server-rounds": 3, "min-cohort": 2, "min-nodes": 3, "round-timeout": 120.0, "local-steps": 2, "lr": 0.1,
           "model-path": str(models / "honest.pt"), "required-policy": str(models / "policy.toml"),
           "adversary-model": str(models / "trap.pt"), "adversary-round": 2})
    d.wait_for("the end of the run", lambda evs: any(e["event"] == "run-end" for e in evs), timeout=420)
    per_round = rounds(d)
    statuses = {r: {c["partition"]: c["status"] for c in per_round[r]["clients"]} for r in (1, 2, 3)}
    assert statuses[1] == {"p0": "released", "p1": "released", "p2": "released"}, statuses
    assert statuses[2] == {"p0": "refused", "p1": "refused", "p2": "refused"}, statuses
    assert statuses[3] == {"p0": "released", "p1": "released", "p2": "released"}, statuses
    assert per_round[1]["aggregated"] and not per_round[2]["aggregated"] and per_round[3]["aggregated"]
    prom = (d.out / "metrics.prom").read_text()
    assert 'gradguard_fl_refusals_total{reason="isolation"} 3.0' in prom, prom
    table = (d.out / "rounds.txt").read_text()
    assert "refused the global model: p0, p1, p2" in table, table
    for p in range(3):
        records = [json.loads(line) for line in (d.out / f"audit-p{p}.jsonl").read_text().splitlines()]
        refused = [r for r in records if r["outcome"] == "refused"]
        assert len(refused) == 1 and refused[0]["reason"].startswith("refused: the global model isolates"), refused
    print("\n" + table)
