"""What each kind of policy rule does against a malicious server, measured through the real guard.

A server that chooses the parameters it sends can make a client's release give its samples
back: trap weights (Boenisch et al. 2021) make each first-layer unit fire for about one sample of
the batch, so that x = dW_u / db_u for that unit (the analytic attack of METRICS.md, M4). This
script sends the digits MLPs of tests/fixtures/malicious_models.py (honest, and trap weights
built for the batch size the client will release) to gradguard_fl.train under one policy of
each kind, takes fc0 of each release exactly as it would leave the client, runs the analytic
attack on it and counts the node's samples it gives back at PSNR >= 30 dB (peak = the data's
range; oracle matching against every sample of the node: an upper bound on the attack).

    source scripts/env.sh && python scripts/malicious-server-figures.py [OUT_DIR]

Needs the project venv with gradguard_fl built from this checkout (scripts/federated-setup.sh):
policies on M6 (`exposed_fraction`) need an extension built after M6 joined the guard.
docs/FEDERATED.md ("What holds against a malicious server") quotes its output.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RELEASES = 4

ROUND = """version = 2
[settings]
seed = 0
estimate_every = 1
estimate_before_release = true
max_estimate_age_steps = 1
background_estimates = false
budget_share = 1.0
on_violation = "withhold"
"""

POLICIES = {
    "no rule": ROUND,
    # The old shipped default's first-layer rule, on every layer: S_l^rms thresholds.
    "S_l^rms threshold 0.002": ROUND + """
[[rule]]
name = "sensitivity"
metric = "sensitivity_rms"
layers = ["*"]
act_above = 0.002
relax_below = 0.001
ladder = [{ action = "clip", max_norm = 0.05 }, { action = "sparsify", keep_fraction = 0.25 }, { action = "withhold" }]
""",
    # A threshold the trap crosses, met by clipping: the release leaves clipped.
    "S_l threshold 0.05, met by a clip": ROUND + """
[[rule]]
name = "sensitivity"
metric = "sensitivity"
layers = ["*"]
act_above = 0.05
relax_below = 0.01
ladder = [{ action = "clip", max_norm = 0.01 }, { action = "withhold" }]
""",
    "aggregation floor 64": ROUND.replace("on_violation", "aggregation_floor = 64\non_violation"),
    "calibrated noise, 0.01 bits/dim per layer": ROUND + """
calibration_margin_se = 2.0
[[rule]]
name = "bound"
metric = "reconstruction_bound_bits"
layers = ["*"]
act_above = 0.01
relax_below = 0.002
ladder = [{ action = "noise", clip_norm = 10.0, target = "threshold" }]
""",
    "M6 exposed_fraction above 0.5: withhold": ROUND + """
[[rule]]
name = "isolation"
metric = "exposed_fraction"
layers = ["*"]
act_above = 0.5
relax_below = 0.25
ladder = [{ action = "withhold" }]
""",
    "default.toml": (ROOT / "federated" / "gradguard_federated" / "policies" / "default.toml").read_text(),
}


def analytic(update: dict, x: np.ndarray, peak: float) -> tuple[int, float]:
    """Samples of x that some unit of fc0 gives back at PSNR >= 30 dB, and the best PSNR."""
    dw, db = update["fc0.weight"].astype(np.float64), update["fc0.bias"].astype(np.float64)
    ok = np.abs(db) > 1e-12
    if not ok.any():
        return 0, float("-inf")
    xh = dw[ok] / db[ok, None]
    mse = np.stack([((xh - s) ** 2).mean(axis=1).min() for s in x.astype(np.float64)])
    psnr = 10 * np.log10(peak**2 / np.maximum(mse, 1e-30))
    return int((psnr >= 30).sum()), float(psnr.max())


def run(gradguard_fl, folder: Path, model: str, policy: str, batch: int) -> str:
    x = np.load(folder / "data" / "x.npy")
    peak = float(x.max() - x.min())
    path = str(folder / f"{model}.pt")
    params = gradguard_fl.initial_parameters(model_path=path)
    recovered, best, facts, why = 0, float("-inf"), [], ""
    for r in range(1, RELEASES + 1):
        cfg = {"local-steps": 1, "lr": 0.1, "batch-size": batch, "seed": r, "server-round": r, "policy": POLICIES[policy], "model-path": path}
        res = gradguard_fl.train(params, cfg, gradguard_fl.DataDir(str(folder / "data")))
        report = json.loads(res.report) if res.report else {"layers": []}
        fc0 = next((l for l in report["layers"] if l["name"] == "fc0"), {})
        m1 = fc0.get("sensitivity", {})
        m6 = fc0.get("sample_isolation", {})
        facts.append((m1.get("sensitivity"), m1.get("sensitivity_rms"), m6.get("exposed_fraction")))
        if not res.manifest:
            # The client vetted the parameters it was sent and refused the round (M6).
            state, why = "refused", res.reason or ""
            continue
        manifest = json.loads(res.manifest)
        actions = next(l["actions"] for l in manifest["layers"] if l["name"] == "fc0")
        if res.blocked or "fc0.weight" not in res.update:
            state = "blocked" if res.blocked else "withheld"
            continue
        state = "+".join(a.split("(")[0] for a in actions) or "raw"
        got, top = analytic(res.update, x, peak)
        recovered += got
        best = max(best, top)
    s, s_rms, exposed = (np.mean([f[i] for f in facts if f[i] is not None]) if any(f[i] is not None for f in facts) else float("nan") for i in range(3))
    line = f"{model:6} {policy:42} fc0 {state:9} S_l {s:.4f} S_rms {s_rms:.2e} exposed {exposed:.2f}  recovered {recovered:3}/{RELEASES * batch}  best PSNR {best:5.1f} dB"
    return line + (f"\n         ({why})" if why else "")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="gradguard-malicious-"))
    import gradguard_fl

    for batch in (32, 64):
        folder = out / f"built-for-{batch}"
        subprocess.run([sys.executable, str(ROOT / "tests" / "fixtures" / "malicious_models.py"), str(folder), "--batch-size", str(batch)], check=True)
        print(f"releases of n = {batch} samples (local-steps 1, batch-size {batch}), trap weights built for {batch}; {RELEASES} releases each:")
        # The floor of 64 is met only by releases of 64: the server then builds the trap for 64.
        policies = [p for p in POLICIES if p != "aggregation floor 64"] if batch == 32 else ["aggregation floor 64", "default.toml"]
        for model in ("honest", "trap"):
            for policy in policies:
                print("  " + run(gradguard_fl, folder, model, policy, batch), flush=True)
    print(f"(models and data in {out})")


if __name__ == "__main__":
    main()
