"""What the PyTorch front end costs, and whether it measures what the Rust engine measures.

1. Cost, side by side: for a ResNet-style CNN with batch norm and an nn.TransformerEncoder text
   classifier (token ids, embedding split declared), the same training loop unguarded, guarded
   with `guard.step` after the user's backward, and guarded with `guard.train_step` (one forward
   and backward shared with the estimate); observe-only (no policy) at the default 5% budget,
   with only the estimate age bound lifted to the run's length (as benches/real_models.rs does).
   The runs alternate (unguarded, step, train_step, repeated) so that a busy machine slows all
   three alike; the figure is guarded / unguarded wall time, median over the repeats.
2. M1 from Python against the Rust engine on the same model saved as TorchScript (`gradguard
   audit` on the same batch, eval mode): per layer S_l and its standard error from each, and
   whether they agree within 3 combined standard errors.

    python benches/pytorch_cost.py [--steps 60] [--repeats 3] [--models resnet,transformer]
        [--gradguard target/release/gradguard] [--json out/pytorch_cost.json]

Quick check (a few minutes on 2 cores): --steps 20 --repeats 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradguard

ROOT = Path(__file__).resolve().parent.parent


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet-18 layout (two blocks per stage, four stages) at base width `w`."""

    def __init__(self, w=16, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        stages, cin = [], w
        for k, stride in enumerate((1, 2, 2, 2)):
            cout = w * 2**k
            stages += [Block(cin, cout, stride), Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TextClassifier(nn.Module):
    def __init__(self, vocab=4000, d=64, heads=4, layers=2, classes=2, length=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def embed(self, tokens):
        return self.emb(tokens)

    def forward_embedded(self, e):
        return self.head(self.encoder(e + self.pos).mean(1))

    def forward(self, tokens):
        return self.forward_embedded(self.embed(tokens))


def data(model_name, steps, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    if model_name == "resnet":
        return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(steps)]
    return [(torch.randint(0, 4000, (batch, 32), generator=g), torch.randint(0, 2, (batch,), generator=g)) for _ in range(steps)]


def build(model_name):
    torch.manual_seed(0)
    model = ResNet() if model_name == "resnet" else TextClassifier()
    model.train()
    return model


def timed_run(model_name, mode, batches):
    """Wall seconds of the loop; the steps that estimated and the seconds their reports give; the
    guard's own share of the run: for `step`, the time inside `guard.step` less the optimizer's
    step it calls (what the same loop spends anyway), measured in this run; for both modes, the
    engine's `spent_share` (its time over the run's, the budget's measure) from the last report.
    Measured within one run, the shares do not move with the machine's load as the ratio of two
    runs' wall times does."""
    model = build(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = lambda x, y: F.cross_entropy(model(x), y)
    guard = None
    stepping = [0.0]
    if mode != "unguarded":
        embedding = None
        if model_name == "transformer":
            embedding = (model.embed, lambda e, y: F.cross_entropy(model.forward_embedded(e), y))
        guard = gradguard.wrap(model, opt, loss_fn, settings={"max_estimate_age_steps": max(len(batches) + 1, 10)}, embedding=embedding)
        plain_step = opt.step

        def timed_step(*args, **kw):  # the engine calls optimizer.step() by name: this one
            t = time.perf_counter()
            out = plain_step(*args, **kw)
            stepping[0] += time.perf_counter() - t
            return out

        opt.step = timed_step
    estimated, guard_seconds, inside = 0, 0.0, 0.0
    release = None
    torch.manual_seed(1)
    start = time.perf_counter()
    for x, y in batches:
        if mode == "train_step":
            release = guard.train_step(x, y)
        else:
            opt.zero_grad()
            loss_fn(x, y).backward()
            if guard is None:
                opt.step()
                continue
            t = time.perf_counter()
            release = guard.step(x, y)
            inside += time.perf_counter() - t
        estimated += release.estimated
        guard_seconds += release.estimate_seconds or 0.0
    wall = time.perf_counter() - start
    shares = {}
    if release is not None:
        shares["engine"] = release.report["health"]["spent_share"]
        if mode == "step":
            shares["python"] = (inside - stepping[0]) / wall
    return wall, (estimated, round(guard_seconds, 2)), shares


def cost(model_name, steps, repeats, batch):
    batches = data(model_name, steps, batch)
    timed_run(model_name, "unguarded", batches[:3])  # warm-up: allocator, kernels
    times = {"unguarded": [], "step": [], "train_step": []}
    estimates = {"step": [], "train_step": []}
    shares = {"step": [], "train_step": []}
    for _ in range(repeats):
        for mode in times:
            seconds, n, share = timed_run(model_name, mode, batches)
            times[mode].append(seconds)
            if mode in estimates:
                estimates[mode].append(n)
                shares[mode].append(share)
    median = {m: statistics.median(t) for m, t in times.items()}
    in_run = lambda mode, key: statistics.median(s[key] for s in shares[mode])
    return {
        "model": model_name,
        "steps": steps,
        "batch": batch,
        "repeats": repeats,
        "seconds": times,
        "estimates": estimates,
        "shares": shares,
        "ratio_step": median["step"] / median["unguarded"],
        "ratio_train_step": median["train_step"] / median["unguarded"],
        # guarded / unguarded as one run sees it: 1 / (1 - the guard's share of the run)
        "in_run_step": 1.0 / (1.0 - in_run("step", "python")),
        "engine_step": 1.0 / (1.0 - in_run("step", "engine")),
        "engine_train_step": 1.0 / (1.0 - in_run("train_step", "engine")),
    }


def m1_against_rust(gradguard_bin, probes, batch):
    """S_l per layer from Python (guard.estimate) and from `gradguard audit` on the TorchScript
    of the same ResNet, eval mode, the same batch and seed."""
    model = build("resnet")
    model.eval()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = gradguard.wrap(model, opt, lambda a, b: F.cross_entropy(model(a), b), settings={"probes": probes, "seed": 0, "background_estimates": False})
    python = {l["name"]: l["sensitivity"] for l in guard.estimate(x, y)["layers"]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.jit.script(model).save(str(tmp / "net.pt"))
        np.save(tmp / "x.npy", x.numpy())
        np.save(tmp / "y.npy", y.numpy())
        cmd = [str(gradguard_bin), "audit", "--model", str(tmp / "net.pt"), "--inputs", str(tmp / "x.npy"), "--labels", str(tmp / "y.npy"),
               "--batch-size", str(batch), "--probes", str(probes), "--seed", "0", "--attack-releases", "0", "--json", str(tmp / "audit.json")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"gradguard audit failed:\n{done.stderr}")
        rust = {l["name"]: l for l in json.loads((tmp / "audit.json").read_text())["layers"]}
    rows = []
    for name, p in python.items():
        r = rust[name]
        se = (p["sensitivity_se"] ** 2 + r["sensitivity_se"] ** 2) ** 0.5
        z = (p["sensitivity"] - r["sensitivity"]) / se if se > 0 else float("inf")
        rows.append({"layer": name, "python": p["sensitivity"], "python_se": p["sensitivity_se"], "rust": r["sensitivity"], "rust_se": r["sensitivity_se"], "z": z})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--models", default="resnet,transformer")
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--gradguard", default=str(ROOT / "target" / "release" / "gradguard"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    results = {"cost": [], "m1": None, "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} steps x {args.repeats} repeats, batch {args.batch}")
    print("estimates: (count, seconds the reports give) per repeat, step / train_step; the first estimate is due at step 0,")
    print("so a short run measures mostly it: the 5% budget shows only over hundreds of steps (docs/PERFORMANCE.md)")
    print("in-run: 1 / (1 - the guard's share of its own run): for step, the time inside guard.step less the optimizer's step;")
    print("engine: the same from the engine's own clock (its report's spent_share), which leaves out the Python wrapper")
    print(f"{'model':12} {'unguarded s':>12} {'step s':>9} {'train_step s':>13} {'step/ung':>9} {'train/ung':>10} {'step in-run':>12} {'step engine':>12} {'train engine':>13}  estimates")
    for name in args.models.split(","):
        c = cost(name, args.steps, args.repeats, args.batch)
        results["cost"].append(c)
        med = {m: statistics.median(t) for m, t in c["seconds"].items()}
        print(f"{name:12} {med['unguarded']:12.2f} {med['step']:9.2f} {med['train_step']:13.2f} {c['ratio_step']:9.3f} {c['ratio_train_step']:10.3f} "
              f"{c['in_run_step']:12.3f} {c['engine_step']:12.3f} {c['engine_train_step']:13.3f}  {c['estimates']['step']} / {c['estimates']['train_step']}")
    rows = m1_against_rust(args.gradguard, args.probes, args.batch)
    results["m1"] = rows
    print(f"\nM1 on the ResNet (eval mode, batch {args.batch}, K = {args.probes}): Python guard.estimate vs gradguard audit on its TorchScript")
    print(f"{'layer':24} {'S_l python':>12} {'SE':>10} {'S_l rust':>12} {'SE':>10} {'z':>7}")
    for r in rows:
        print(f"{r['layer']:24} {r['python']:12.5g} {r['python_se']:10.3g} {r['rust']:12.5g} {r['rust_se']:10.3g} {r['z']:7.2f}")
    agree = all(abs(r["z"]) <= 3 for r in rows)
    print(f"within 3 standard errors on every layer: {agree}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
