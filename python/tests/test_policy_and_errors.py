"""Policies from Python: a blocking policy leaves the model as it was and never steps; the noise
written into p.grad is the engine's on the same gradient and seed. Bad input raises a typed
exception with the message and leaves the model untouched."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gradguard
from models import BatchNormCnn, GruTokens, cnn_batch, made, token_batch

POLICIES = Path(__file__).resolve().parent / "policies"


class CountingSgd(torch.optim.SGD):
    def __init__(self, params):
        super().__init__(params, lr=0.1, momentum=0.9)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def setup(policy=None, settings=None, **kw):
    model = made(BatchNormCnn, dtype=torch.float32)
    model.train()
    opt = CountingSgd(model.parameters())
    loss_fn = lambda x, y: F.cross_entropy(model(x), y)
    guard = gradguard.wrap(model, opt, loss_fn, policy=policy, settings=settings, **kw)
    return model, opt, loss_fn, guard


def snapshot(model):
    return {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}


def assert_untouched(model, before):
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.equal(t, before[n]), n


def assert_grads_zero(model):
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("path", ["step", "train_step"])
def test_a_blocking_policy_never_steps(path):
    model, opt, loss_fn, guard = setup(POLICIES / "block-all.toml")
    x, y = cnn_batch(dtype=torch.float32)
    before = snapshot(model)
    for _ in range(3):
        if path == "step":
            opt.zero_grad()
            loss_fn(x, y).backward()
            release = guard.step(x, y)
        else:
            release = guard.train_step(x, y)
        assert release.blocked and not release.released
        assert "above threshold" in release.reason
        assert_grads_zero(model)
    assert opt.steps == 0
    # The running statistics move on the user's own forward only (step); train_step's forward is
    # the user's training forward too, so compare parameters there.
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_a_withholding_policy_releases_nothing():
    model, opt, loss_fn, guard = setup(POLICIES / "withhold-all.toml")
    x, y = cnn_batch(dtype=torch.float32)
    before = snapshot(model)
    release = guard.train_step(x, y)
    assert release.released
    assert all(layer["actions"] == ["withhold"] for layer in release.report["release"]["layers"])
    assert_grads_zero(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_protection_in_place_equals_the_explicit_release():
    # Two guards with the same policy and noise key over two copies of the model: the in-place
    # step (p.grad) and the engine's explicit release of the same gradient (the form a federated
    # client uses) give the same protected tensors, bit for bit.
    model, opt, loss_fn, guard = setup(POLICIES / "noise-all.toml", noise_key=42)
    twin = copy.deepcopy(model)
    twin_guard = gradguard.wrap(twin, torch.optim.SGD(twin.parameters(), lr=0.1), lambda a, b: F.cross_entropy(twin(a), b), policy=POLICIES / "noise-all.toml", noise_key=42)
    x, y = cnn_batch(dtype=torch.float32)
    opt.zero_grad()
    loss_fn(x, y).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    explicit = twin_guard.release(raw, x, y)
    # The twin was copied before the user's forward moved the running statistics; in training
    # mode batch norm normalises by the batch's own, so they do not enter the gradient.
    released = guard.step(x, y)
    assert released.released and explicit.released
    noised = [l["name"] for l in released.report["release"]["layers"] if l["actions"]]
    assert "conv1" in noised and "fc" in noised
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, explicit.update[n]), n
    assert not torch.equal(model.conv1.weight.grad, raw["conv1.weight"])
    # A different key gives different noise: the comparison is of the seeded noise itself.
    third = copy.deepcopy(twin)
    other = gradguard.wrap(third, torch.optim.SGD(third.parameters(), lr=0.1), lambda a, b: F.cross_entropy(third(a), b), policy=POLICIES / "noise-all.toml", noise_key=43)
    assert not torch.equal(other.release(raw, x, y).update["conv1.weight"], explicit.update["conv1.weight"])


def bad_step(guard, opt, loss_fn, model, x, y, **kw):
    opt.zero_grad()
    loss_fn(*cnn_batch(dtype=torch.float32)).backward()
    before = snapshot(model)
    with pytest.raises(gradguard.GradguardError) as err:
        guard.step(x, y, **kw)
    assert_untouched(model, before)
    assert_grads_zero(model)
    assert opt.steps == 0
    return err.value


def test_bad_batches_raise_input_errors():
    model, opt, loss_fn, guard = setup(settings={"estimate_every": 1, "background_estimates": False})
    x, y = cnn_batch(dtype=torch.float32)
    # A good step first: it fixes the sample shape (the engine fixes it on the first batch it
    # reads, even one that then fails).
    opt.zero_grad()
    loss_fn(x, y).backward()
    assert guard.step(x, y).released
    opt.steps = 0
    e = bad_step(guard, opt, loss_fn, model, torch.zeros(6, 1, 7, 7), y)
    assert isinstance(e, gradguard.InputError) and "shape" in str(e)
    e = bad_step(guard, opt, loss_fn, model, x, y[:4])
    assert isinstance(e, gradguard.InputError) and "targets" in str(e)
    e = bad_step(guard, opt, loss_fn, model, x, y, attribute=torch.zeros(3, dtype=torch.long))
    assert isinstance(e, gradguard.InputError) and "attribute" in str(e)
    e = bad_step(guard, opt, loss_fn, model, x.to("meta"), y)
    assert isinstance(e, gradguard.InputError) and "meta" in str(e)
    e = bad_step(guard, opt, loss_fn, model, x.double(), y)
    assert isinstance(e, gradguard.InputError) and "float64" in str(e)
    e = bad_step(guard, opt, loss_fn, model, x.numpy(), y)
    assert isinstance(e, gradguard.InputError) and "torch.Tensor" in str(e)


def test_a_loss_that_raises_is_the_input_errors_cause():
    model, opt, loss_fn, guard = setup(settings={"estimate_every": 1, "background_estimates": False})
    x, y = cnn_batch(dtype=torch.float32)
    # The wrong shape on the very first batch reaches the user's loss inside the guard's pass.
    e = bad_step(guard, opt, loss_fn, model, x[:, :, :5], y)
    assert isinstance(e, gradguard.InputError) and "loss_fn raised RuntimeError" in str(e)
    assert isinstance(e.__cause__, RuntimeError)
    assert "Exception raised from" not in str(e) and "frame #" not in str(e)  # no C++ backtrace


@pytest.mark.parametrize("path", ["step", "train_step"])
def test_a_nan_loss_raises_and_nothing_steps(path):
    model, opt, loss_fn, guard = setup(settings={"estimate_every": 1, "background_estimates": False})
    x, y = cnn_batch(dtype=torch.float32)
    x[0, 0, 0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(gradguard.InputError, match="not finite") as err:
        if path == "step":
            opt.zero_grad()
            loss = loss_fn(x, y)
            assert torch.isnan(loss)
            loss.backward()
            before = snapshot(model)  # the user's own forward moved the running statistics
            guard.step(x, y)
        else:
            guard.train_step(x, y)
    assert err.value.release.blocked
    assert opt.steps == 0
    assert_grads_zero(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_malformed_policies_raise_policy_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("version = 2\n[[rule]]\nname = 'x'\nmetric = 'sensitivity'\n")
    with pytest.raises(gradguard.PolicyError, match="bad.toml"):
        setup(bad)
    with pytest.raises(gradguard.PolicyError, match="nowhere.toml"):
        setup(tmp_path / "nowhere.toml")
    unmatched = tmp_path / "unmatched.toml"
    unmatched.write_text(
        "version = 2\n[[rule]]\nname = 'r'\nmetric = 'sensitivity'\nlayers = ['decoder.*']\nact_above = 1.0\nrelax_below = 0.5\n"
        "ladder = [{ action = 'withhold' }]\n"
    )
    with pytest.raises(gradguard.PolicyError, match="decoder"):
        setup(unmatched)
    with pytest.raises(gradguard.PolicyError, match="probez"):
        setup(settings={"probez": 8})
    with pytest.raises(gradguard.PolicyError, match="budget_share"):
        setup(settings={"budget_share": 2.0})


def test_settings_are_laid_over_the_policy():
    _, _, _, guard = setup(POLICIES / "block-all.toml", settings={"probes": 3})
    assert guard.settings["probes"] == 3 and guard.settings["on_violation"] == "block"
    _, _, _, plain = setup(POLICIES / "block-all.toml")
    assert plain.settings["probes"] == 8 and plain.policy_hash != guard.policy_hash


def test_layers_are_module_paths():
    model = made(GruTokens)
    guard = gradguard.wrap(model, torch.optim.SGD(model.parameters(), 0.1), lambda t, y: F.cross_entropy(model(t), y))
    assert guard.layer_names == ["emb", "gru", "head"]


def test_audit_log_and_metrics_endpoint(tmp_path):
    import json
    import urllib.request

    log = tmp_path / "out" / "audit.jsonl"
    model, opt, loss_fn, guard = setup(POLICIES / "block-all.toml", metrics="127.0.0.1:0", audit_log=log)
    x, y = cnn_batch(dtype=torch.float32)
    assert guard.train_step(x, y).blocked
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records and any("block" in json.dumps(r) for r in records)
    assert guard.metrics_address.startswith("127.0.0.1:") and not guard.metrics_address.endswith(":0")
    import time

    deadline = time.time() + 10
    while True:  # the report reaches the exporter on the guard's fan-out worker
        body = urllib.request.urlopen(f"http://{guard.metrics_address}/metrics", timeout=5).read().decode()
        if 'gradguard_layer_leakage{' in body or time.time() > deadline:
            break
        time.sleep(0.1)
    assert 'layer="conv1"' in body and "gradguard_layer_leakage{" in body


def test_the_live_page_and_the_run_report_of_a_python_run(tmp_path):
    """The live page is the exporter's, as for a Rust run; the run report is rendered from the
    run's folder (audit.jsonl, and report.json where the loop writes its last report) by the
    same `gradguard report` a Rust run uses."""
    import json
    import subprocess
    import urllib.request

    out = tmp_path / "out"
    model, opt, loss_fn, guard = setup(POLICIES / "noise-all.toml", metrics="127.0.0.1:0", audit_log=out / "audit.jsonl")
    x, y = cnn_batch(dtype=torch.float32)
    for _ in range(3):
        release = guard.train_step(x, y)
        assert release.released
    page = urllib.request.urlopen(f"http://{guard.metrics_address}/", timeout=5).read().decode()
    assert "<html" in page.lower() and "/report" in page
    (out / "report.json").write_text(json.dumps(release.report))
    cli = Path(__file__).resolve().parents[2] / "target" / "release" / "gradguard"
    assert cli.exists(), f"{cli}: built by make test's cargo step (cargo build --release --bin gradguard)"
    done = subprocess.run([str(cli), "report", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    html = (out / "report.html").read_text()
    assert "conv1" in html and "records verified" in html and "noise" in html

