"""A real SuperLink with two honest SuperNodes and two tampered ones (a node whose guard is
bypassed: a raw update without a manifest, and a raw update under a forged manifest hash).
The server rejects and counts both every round and aggregates from the honest nodes alone;
nothing of the tampered updates reaches the global model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from test_deployment import Deployment, deployment, npz, received, rounds  # noqa: F401 - the fixture

TAMPERED = Path(__file__).resolve().parent / "tampered"
LR, LOCAL_STEPS = 0.1, 10


def test_tampered_clients_are_rejected_and_the_round_aggregates(deployment: Deployment):
    d = deployment
    d.start_superlink()
    for p in range(4):
        env = {"PYTHONPATH": str(TAMPERED), "GRADGUARD_TAMPER": ["raw", "forge"][p - 2]} if p >= 2 else None
        d.start_supernode(f"node-p{p}", {"partition-id": p, "num-partitions": 4, "policy": "default.toml"}, env=env)
    d.run({"num-server-rounds": 2, "min-cohort": 2, "min-nodes": 4, "round-timeout": 120.0, "fraction-evaluate": 0.0,
           "local-steps": LOCAL_STEPS, "lr": LR, "required-policy": "default.toml"})
    d.wait_for("the end of the run", lambda evs: any(e["event"] == "run-end" for e in evs), timeout=400)

    per_round = rounds(d)
    got = received(d)
    for r in (1, 2):
        clients = {c["partition"]: c for c in per_round[r]["clients"]}
        assert per_round[r]["aggregated"] and per_round[r]["compliant"] == 2, per_round[r]
        assert clients["p0"]["status"] == clients["p1"]["status"] == "released"
        # The raw one carries no manifest, so the server knows it only by node id.
        raw = [c for c in per_round[r]["clients"] if c["reject"] == "no-manifest"]
        assert len(raw) == 1 and raw[0]["status"] == "rejected", per_round[r]["clients"]
        assert clients["p3"]["status"] == "rejected" and clients["p3"]["reject"] == "forged-manifest"
        assert "shows no check of its rules" in clients["p3"]["reason"]
        assert set(per_round[r]["contributors"]["fc2"]) == {"p0", "p1"}
        # The tampered nodes did send arrays (every layer, raw): captured, never averaged.
        for c in (raw[0], clients["p3"]):
            sent = [e for e in got if e["round"] == r and e["node_id"] == c["node_id"]]
            assert sent and sent[0]["array_bytes"] > 0
        # The aggregate is the honest nodes' weighted mean alone.
        before, after = npz(d.out / f"global-round{r - 1}.npz"), npz(d.out / f"global-round{r}.npz")
        ups = {p: npz(d.out / "received" / f"round{r}-node{clients[p]['node_id']}-arrays.npz") for p in ("p0", "p1")}
        n = {p: clients[p]["num_examples"] for p in ("p0", "p1")}
        for name in before:
            honest = [p for p in ("p0", "p1") if name in ups[p]]
            if not honest:
                np.testing.assert_array_equal(after[name], before[name])
                continue
            mean = sum(n[p] * ups[p][name].astype(np.float64) for p in honest) / sum(n[p] for p in honest)
            np.testing.assert_allclose(after[name], before[name] - LR * LOCAL_STEPS * mean, rtol=1e-5, atol=1e-6)
    metrics = (d.out / "metrics.prom").read_text()
    assert 'gradguard_server_rejected_total{reason="no-manifest"} 2.0' in metrics
    assert 'gradguard_server_rejected_total{reason="forged-manifest"} 2.0' in metrics
    print("\n" + (d.out / "rounds.txt").read_text())
