"""A PyTorch training loop guarded by gradguard: the shipped digits, a small batch-norm CNN, the
stroke-weight attribute (data/README.md) for M2, the example policy, an audit log and a
Prometheus endpoint. The unguarded loop is the same without the three marked lines.

    python examples/pytorch_loop.py [steps] [--metrics 127.0.0.1:9464]

(from the repository root, in the project venv: scripts/federated-setup.sh installs gradguard;
README "Guard a PyTorch loop" for a venv of your own.)
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradguard

ROOT = Path(__file__).resolve().parent.parent


def digits():
    """The shipped digits as (images [n, 1, 8, 8] in [0, 1], labels, stroke weight)."""
    rows = np.loadtxt(gzip.open(ROOT / "data" / "digits.csv.gz", "rt"), delimiter=",", dtype=np.int64)
    x, y = rows[:, :64].astype(np.float32) / 16.0, rows[:, 64]
    ink = x.sum(axis=1)
    heavy = np.zeros(len(y), dtype=np.int64)
    for digit in range(10):
        cls = y == digit
        heavy[cls] = ink[cls] > np.median(ink[cls])
    return torch.from_numpy(x).view(-1, 1, 8, 8), torch.from_numpy(y), torch.from_numpy(heavy)


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", type=int, nargs="?", default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--policy", default=str(ROOT / "examples" / "pytorch_policy.toml"))
    parser.add_argument("--metrics", default=None, help="host:port of a Prometheus endpoint (e.g. 127.0.0.1:9464)")
    parser.add_argument("--audit-log", default="out/pytorch-audit.jsonl")
    args = parser.parse_args()

    torch.manual_seed(0)
    x_all, y_all, a_all = digits()
    model = Cnn()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_fn(x, y):
        return F.cross_entropy(model(x), y)

    # (1) wrap the model and the optimizer: the guard's layers are the model's modules
    guard = gradguard.wrap(model, optimizer, loss_fn, policy=args.policy, metrics=args.metrics, audit_log=args.audit_log)
    print(f"guarding layers {guard.layer_names} under policy {guard.policy_hash[:12]}")
    released = blocked = 0
    for step in range(args.steps):
        idx = torch.randint(0, len(y_all), (args.batch,))
        x, y, a = x_all[idx], y_all[idx], a_all[idx]
        optimizer.zero_grad()
        loss = loss_fn(x, y)
        loss.backward()
        # (2) instead of optimizer.step(): measure, protect p.grad, step if released
        release = guard.step(x, y, attribute=a)
        # (3) what happened (optional)
        if release.estimated:
            print(guard.table(release))
        if release.blocked:
            blocked += 1
            print(f"step {step}: blocked: {release.reason}")
        elif release.released:
            released += 1
    with torch.no_grad():
        model.eval()
        accuracy = (model(x_all).argmax(1) == y_all).float().mean().item()
    print(f"{released} released, {blocked} blocked of {args.steps} steps; training accuracy {accuracy:.3f}; audit log {args.audit_log}")


if __name__ == "__main__":
    main()
