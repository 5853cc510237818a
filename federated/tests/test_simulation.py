"""Flower's Simulation Engine (Ray backend) runs the same ServerApp and ClientApp with virtual
SuperNodes: a SuperLink in simulation mode, `flwr run --federation-config num-supernodes=N`.
Each virtual node trains the test's TorchScript MLP on its own `partition-<id>/` folder of the
run's `data-dir`; every round, every client's reply must carry a manifest of the required
policy that the server verified and aggregated."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from byo import CHANCE, POLICIES, save_mlp, write_node
from test_deployment import Deployment, deployment, rounds  # noqa: F401 - the fixture

CLIENTS = 10


def test_simulation_with_ten_virtual_clients(deployment: Deployment, tmp_path):
    d = deployment
    model = save_mlp(tmp_path / "mlp.pt")
    data = tmp_path / "data"
    for p in range(CLIENTS):
        write_node(data / f"partition-{p}", p, n=200)
    # The virtual nodes' audit logs go under $TMPDIR (no node config in simulation). A short
    # folder: Ray puts its sockets there too, and a Unix socket path is limited to 107 bytes.
    short = Path(tempfile.mkdtemp(prefix="gg-sim-", dir="/tmp"))
    try:
        simulate(d, tmp_path, model, data, short)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def simulate(d: Deployment, tmp_path: Path, model: Path, data: Path, tmpdir: Path) -> None:
    d.start_superlink(simulation=True, env={"TMPDIR": str(tmpdir)})
    policy = POLICIES / "mlp-observe.toml"
    d.run(
        {"num-server-rounds": 2, "min-cohort": CLIENTS, "min-nodes": CLIENTS, "round-timeout": 300.0, "local-steps": 10,
         "lr": 0.1, "model-path": str(model), "data-dir": str(data), "default-policy": str(policy), "required-policy": str(policy)},
        extra=("--federation-config", f"num-supernodes={CLIENTS} client-resources-num-cpus=1"),
    )
    d.wait_for("the end of the run", lambda evs: any(e["event"] == "run-end" for e in evs), timeout=600)
    per_round = rounds(d)
    for r in (1, 2):
        record = per_round[r]
        assert record["aggregated"] and record["compliant"] == CLIENTS, record
        clients = record["clients"]
        assert sorted(c["partition"] for c in clients) == sorted(f"p{p}" for p in range(CLIENTS))
        assert all(c["status"] == "released" and c["reject"] is None for c in clients)
        assert {c["policy_hash"] for c in clients} == {record["clients"][0]["policy_hash"]}
        assert {c["step"] for c in clients} == {r - 1}  # each virtual node's guard remembered
    assert per_round[2]["federated_accuracy"] > CHANCE + 0.2, per_round[2]
    # Each virtual node appended its decisions to its own audit log, round after round.
    logs = sorted(tmpdir.glob("gradguard-fl-*-p*/audit.jsonl"))
    assert len(logs) == CLIENTS, logs
    for log in logs:
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        steps = {r["step"] for r in records if r["outcome"] != "state_saved"}
        assert steps == {0, 1}, (log, steps)
        # The guard's state after each release, kept beside the log: saved at steps 1 and 2.
        assert [r["step"] for r in records if r["outcome"] == "state_saved"] == [1, 2], log
        assert Path(str(log) + ".state.json").exists()
    print("\n" + (d.out / "rounds.txt").read_text())
