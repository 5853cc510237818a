"""A layer whose gradient moves with the inputs along a path autograd did not record is measured,
not reported "safe": a linear probe on a backbone run under ``torch.no_grad`` (its features
come back from the head's gradient, while a double backward would measure the head's M1 as
exactly 0) and a bias behind a once-differentiable function. The guard names the cut layers in
the report's health and measures M1 by central differences; the numbers equal those of the
same function with the record intact (f64, the same probes), and the attack agrees: the head's
gradient of one sample gives its features back."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import gradguard

SETTINGS = {"estimate_every": 1, "budget_share": 1.0, "background_estimates": False, "probes": 16}


class LinearProbe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh())
        self.head = torch.nn.Linear(12, 3)
        self.backbone.requires_grad_(False)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def audit(model, loss_fn):
    guard = gradguard.wrap(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), loss_fn, settings=SETTINGS)
    x, y = batch()
    return guard.estimate(x, y)


def head_sensitivity(report, name="head"):
    return next(l["sensitivity"] for l in report["layers"] if l["name"] == name)


def test_a_linear_probe_on_a_no_grad_backbone():
    torch.manual_seed(0)
    model = LinearProbe().double()

    def frozen(x, y):
        with torch.no_grad():
            features = model.backbone(x)
        return F.cross_entropy(model.head(features), y)

    # What the number must agree with: one sample's head gradient gives its features back
    # exactly (row i of dL/dW over dL/db_i), so the head leaks whatever the backbone keeps.
    x, y = batch()
    model.zero_grad()
    frozen(x[:1], y[:1]).backward()
    i = model.head.bias.grad.abs().argmax()
    recovered = model.head.weight.grad[i] / model.head.bias.grad[i]
    assert torch.allclose(recovered, model.backbone(x[:1])[0], rtol=1e-9, atol=0)
    model.zero_grad()

    cut = audit(model, frozen)
    assert cut["health"]["autograd_check"]["cut_layers"] == ["head"]
    s = head_sensitivity(cut)
    assert s["status"] == "measured" and s["method"] == "central_difference" and s["sensitivity"] > 0
    # The same function, the backbone's record kept: the double backward, the same probes.
    whole = audit(model, lambda x, y: F.cross_entropy(model.head(model.backbone(x)), y))
    assert whole["health"]["autograd_check"]["cut_layers"] == []
    reference = head_sensitivity(whole)
    assert reference["method"] == "double_backward"
    assert abs(s["sensitivity"] - reference["sensitivity"]) <= 1e-5 * reference["sensitivity"], (s, reference)


class _OnceDifferentiableSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class Squared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)


def test_a_bias_behind_a_once_differentiable_function():
    torch.manual_seed(0)
    model = Squared().double()
    cut = audit(model, lambda x, y: F.cross_entropy(_OnceDifferentiableSquare.apply(model.fc(x)), y))
    # The bias's gradient reaches the inputs only through the function's backward, which
    # recorded nothing; the weight's reaches them through x as well.
    assert cut["health"]["autograd_check"]["cut_layers"] == ["fc"]
    s = head_sensitivity(cut, "fc")
    reference = head_sensitivity(audit(model, lambda x, y: F.cross_entropy(model.fc(x) ** 2, y)), "fc")
    assert s["method"] == "central_difference" and reference["method"] == "double_backward"
    assert abs(s["sensitivity"] - reference["sensitivity"]) <= 1e-5 * reference["sensitivity"], (s, reference)
