"""A real SuperLink and three SuperNodes (loopback, insecure) train the user's own PyTorch
`nn.Module` (run config `torch-model`, an importable factory; not TorchScript) with torch, each
node releasing through `gradguard.wrap(...).release` under its policy; the server verifies the
manifests and aggregates as for any client. One node's policy withholds fc1 (the guard's levels
go on across rounds from Context.state); two rounds."""

from __future__ import annotations

import textwrap

import numpy as np

from byo import assert_rounds_released_with_fc1_withheld_on_p2, CHANCE, CLASSES, FEATURES, HIDDEN, POLICIES, write_node
from test_deployment import Deployment, deployment, rounds  # noqa: F401 - the fixture

USER_MODEL = f'''
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear({FEATURES}, {HIDDEN})
        self.fc2 = torch.nn.Linear({HIDDEN}, {CLASSES})

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def make():
    return Net()
'''


def test_pytorch_module_two_rounds_three_nodes(deployment: Deployment, tmp_path):
    d = deployment
    code = tmp_path / "usercode"
    code.mkdir()
    (code / "user_model.py").write_text(textwrap.dedent(USER_MODEL))
    env = {"PYTHONPATH": str(code)}
    d.start_superlink(env=env)
    policies = ["mlp-observe.toml", "mlp-observe.toml", "mlp-tight.toml"]
    for p in range(3):
        folder = write_node(tmp_path / f"data-p{p}", p, test_files=(p == 1))
        d.start_supernode(f"node-p{p}", {"partition-id": p, "num-partitions": 3, "data-dir": str(folder), "policy": str(POLICIES / policies[p])}, env=env)
    required = f"{POLICIES / 'mlp-observe.toml'} {POLICIES / 'mlp-tight.toml'}"
    d.run({"num-server-rounds": 2, "min-cohort": 2, "min-nodes": 3, "round-timeout": 120.0, "local-steps": 20,
           "lr": 0.1, "torch-model": "user_model:make", "required-policy": required})
    d.wait_for("the end of the run", lambda evs: any(e["event"] in ("run-end", "run-failed") for e in evs), timeout=420)

    per_round = rounds(d)
    assert sorted(per_round) == [0, 1, 2], per_round
    # The guard's step goes on across rounds (Context.state).
    assert_rounds_released_with_fc1_withheld_on_p2(per_round, range(1, 3))
    # The aggregated model learned (the initial one is about chance).
    assert per_round[2]["federated_accuracy"] >= CHANCE + 0.3, per_round[2]
    # The global model moved from the factory's seeded parameters.
    import sys

    sys.path.insert(0, str(code))
    try:
        from gradguard_federated.torch_task import load_model, parameters

        start = parameters(load_model("user_model:make", 0))
    finally:
        sys.path.remove(str(code))
    with np.load(d.out / "global-round2.npz") as g:
        assert set(g.files) == set(start)
        assert any(not np.array_equal(g[k], start[k]) for k in g.files)
