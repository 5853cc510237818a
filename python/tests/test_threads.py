"""The engine works without the GIL: while a step's protection runs in Rust (noise drawn for a
4M-parameter layer, no Python callback on a step that does not estimate), another Python thread
goes on running. Were the GIL held for the call, that thread could not run a single bytecode
between the call's first and last moments."""

from __future__ import annotations

import threading
import time

import torch
import torch.nn.functional as F

import gradguard

# The first layer's sensitivity (about 0.36) is above the threshold: the rung clips its gradient
# far below it and noises it at every release.
POLICY = """
version = 2
[settings]
estimate_every = 1000
max_estimate_age_steps = 1000
budget_share = 1.0
background_estimates = false
probes = 2

[[rule]]
name = "noise-the-first-layer"
metric = "sensitivity"
layers = ["0"]
act_above = 0.01
relax_below = 0.005
ladder = [{ action = "noise", clip_norm = 1e-4, multiplier = 0.1 }]
"""


def test_another_thread_runs_while_the_engine_protects_a_release(tmp_path):
    policy = tmp_path / "noise.toml"
    policy.write_text(POLICY)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = lambda x, y: F.cross_entropy(model(x), y)
    guard = gradguard.wrap(model, opt, loss_fn, policy=policy)
    x, y = torch.randn(8, 4096), torch.randint(0, 10, (8,))

    def step():
        opt.zero_grad()
        loss_fn(x, y).backward()
        return guard.step(x, y)

    first = step()
    assert first.estimated and first.released, first.reason
    stamps, stop = [], threading.Event()

    def other():
        while not stop.is_set():
            stamps.append(time.perf_counter())

    thread = threading.Thread(target=other)
    thread.start()
    try:
        time.sleep(0.05)
        opt.zero_grad()
        loss_fn(x, y).backward()
        t0 = time.perf_counter()
        release = guard.step(x, y)
        t1 = time.perf_counter()
    finally:
        stop.set()
        thread.join()
    assert release.released and not release.estimated
    assert any(l["actions"] for l in release.report["release"]["layers"]), "the rung did not noise the release"
    d = t1 - t0
    inside = [t for t in stamps if t0 + 0.2 * d < t < t1 - 0.2 * d]
    assert inside, f"no bytecode of the other thread ran during the middle {0.6 * d * 1e3:.1f} ms of the engine's call"
