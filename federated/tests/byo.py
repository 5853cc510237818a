"""Test helpers for "bring your own model and data": a TorchScript MLP saved with the venv's
torch, and per-node .npy folders of a synthetic 4-class problem (Gaussian classes in 16
dimensions, label-skewed per node), with a private binary attribute."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FEATURES, CLASSES, HIDDEN = 16, 4, 32
# Chance on the balanced held-out data is 1 / CLASSES.
CHANCE = 1.0 / CLASSES
POLICIES = Path(__file__).resolve().parent / "policies"


def save_mlp(path: Path, seed: int = 0) -> Path:
    """A 16-32-4 MLP (layers fc1, fc2), scripted and saved with torch.jit.save."""
    import torch

    torch.manual_seed(seed)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(FEATURES, HIDDEN)
            self.fc2 = torch.nn.Linear(HIDDEN, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    torch.jit.save(torch.jit.script(Net()), str(path))
    return path


def _means() -> np.ndarray:
    return np.random.default_rng(1234).normal(0.0, 1.0, size=(CLASSES, FEATURES)) * 0.7


def samples(n: int, rng: np.random.Generator, skew_to: int | None = None, skew: float = 0.6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n samples: inputs float32 [n, 16], class ids int64 [n], attribute int64 [n]."""
    if skew_to is None:
        y = rng.integers(0, CLASSES, size=n)
    else:
        own = rng.random(n) < skew
        y = np.where(own, skew_to % CLASSES, rng.integers(0, CLASSES, size=n))
    attribute = rng.integers(0, 2, size=n)
    x = _means()[y] + rng.normal(0.0, 1.0, size=(n, FEATURES)) + 0.3 * attribute[:, None]
    return x.astype(np.float32), y.astype(np.int64), attribute.astype(np.int64)


def write_node(folder: Path, node: int, n: int = 300, test_files: bool = False, attribute: bool = True) -> Path:
    """A node's data folder: x.npy, y.npy (+ attribute.npy), and with `test_files` a balanced
    held-out x_test.npy / y_test.npy (else the node splits a seeded fraction off x.npy)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(100 + node)
    x, y, a = samples(n, rng, skew_to=node)
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    if attribute:
        np.save(folder / "attribute.npy", a)
    if test_files:
        xt, yt, _ = samples(n // 3, rng)
        np.save(folder / "x_test.npy", xt)
        np.save(folder / "y_test.npy", yt)
    return folder


def layer_decisions(log_path: Path, layer: str, step: int) -> list[dict]:
    """`layer`'s decisions at `step` in a node's audit log: the records written one by one (a
    change of state) and, for a release that changed nothing, the checkpoint's tally of it
    (outcome and level), since the bounded log counts those instead of writing them."""
    import json

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    out = [r for r in records if r["step"] == step and r["layer"] == layer]
    for r in records:
        c = r.get("checkpoint")
        if not c or not c["from_step"] <= step <= c["to_step"]:
            continue
        for t in c["layers"]:
            if t["layer"] != layer:
                continue
            for outcome in ("released", "protected", "withheld"):
                out += [{"step": step, "layer": layer, "outcome": outcome, "level": t["level"], "tally": True}] * t[outcome]
    return out


def assert_rounds_released_with_fc1_withheld_on_p2(per_round: dict, rounds: range) -> None:
    """Every round of a BYO deployment under mlp-observe (p0, p1) and mlp-tight (p2): all three
    nodes compliant and released, p2 withholding fc1, and the guard's step going on across rounds
    (a fresh guard would report 0 every round)."""
    for r in rounds:
        record = per_round[r]
        clients = {c["partition"]: c for c in record["clients"]}
        assert record["aggregated"] and record["compliant"] == 3, record
        assert {c["status"] for c in clients.values()} == {"released"}
        assert clients["p2"]["withheld"] == ["fc1"] and clients["p0"]["withheld"] == []
        assert record["contributors"] == {"fc1": ["p0", "p1"], "fc2": ["p0", "p1", "p2"]}
        assert {c["step"] for c in clients.values()} == {r - 1}
