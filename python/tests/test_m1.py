"""M1 from Python equals a torch.func reference (jacrev of grad) in exact mode, to 1e-6 in f64,
and the probe estimate is within 3 standard errors of it: a batch-norm CNN in training mode
(the samples coupled through the batch statistics), an nn.TransformerEncoder classifier and a
GRU on token ids measured on its embeddings (METRICS.md, M1)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import gradguard
from models import BatchNormCnn, GruTokens, TransformerClassifier, cnn_batch, made, seq_batch, token_batch


def layer_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def reference_s(model, x, y, delta_shape=None, tokens=None):
    """S_l = sqrt(sum_i ||dG_l/dx_i||_F^2 / n) with G the batch-mean gradient, by jacrev of grad.
    Batch norm runs on the batch's statistics without updating running ones (a grad transform
    cannot mutate them), which is the function a training step differentiates."""
    model = copy.deepcopy(model)
    torch.func.replace_all_batch_norm_modules_(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}

    if tokens is None:
        def loss(p, inp):
            return F.cross_entropy(functional_call(model, (p, buffers), (inp,)), y)
        at = x
    else:
        def loss(p, delta):
            return F.cross_entropy(functional_call(model, (p, buffers), (tokens,), {"delta": delta}), y)
        at = torch.zeros(delta_shape, dtype=torch.float64)

    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no second derivative
        jac = jacrev(lambda inp: grad(loss)(params, inp))(at)
    n = at.shape[0]
    sums = {}
    for name, j in jac.items():
        sums[layer_of(name)] = sums.get(layer_of(name), 0.0) + float(j.pow(2).sum())
    return {layer: (total / n) ** 0.5 for layer, total in sums.items()}


def guard_for(model, loss_fn, settings, embedding=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return gradguard.wrap(model, opt, loss_fn, settings={"background_estimates": False, **settings}, embedding=embedding)


def measured(report):
    return {l["name"]: l["sensitivity"] for l in report["layers"]}


def check(model, loss_fn, x, y, reference, embedding=None, representation="input"):
    exact = measured(guard_for(model, loss_fn, {"exact_sensitivity": True}, embedding).estimate(x, y))
    assert set(exact) == set(reference)
    for layer, s_ref in reference.items():
        m = exact[layer]
        assert m["status"] == "measured", (layer, m)
        assert m["exact"] and m["representation"] == representation
        assert s_ref > 0
        assert abs(m["sensitivity"] - s_ref) <= 1e-6 * s_ref, (layer, m["sensitivity"], s_ref)
    probed = measured(guard_for(model, loss_fn, {"probes": 64, "seed": 1}, embedding).estimate(x, y))
    for layer, s_ref in reference.items():
        m = probed[layer]
        assert not m["exact"] and m["probes"] == 64
        assert m["sensitivity_se"] > 0
        assert abs(m["sensitivity"] - s_ref) <= 3 * m["sensitivity_se"], (layer, m["sensitivity"], m["sensitivity_se"], s_ref)


def test_batch_norm_cnn_in_training_mode():
    model = made(BatchNormCnn)
    model.train()
    x, y = cnn_batch()
    before = {n: b.clone() for n, b in model.named_buffers()}
    check(model, lambda a, b: F.cross_entropy(model(a), b), x, y, reference_s(model, x, y))
    # The estimates' passes left the running statistics as they were.
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n


def test_transformer_encoder_classifier():
    # Eval mode: the reference cannot replay the guard's dropout masks; dropout's effect on the
    # random stream is the observe-only test's (test_observe_only.py).
    model = made(TransformerClassifier)
    model.eval()
    x, y = seq_batch()
    check(model, lambda a, b: F.cross_entropy(model(a), b), x, y, reference_s(model, x, y))


def test_gru_on_tokens_measured_on_the_embeddings():
    model = made(GruTokens)
    tokens, y = token_batch()
    embedding = (lambda t: model.emb(t), lambda e, b: F.cross_entropy(model.from_embedded(e), b))
    reference = reference_s(model, None, y, delta_shape=(tokens.shape[0], tokens.shape[1], 4), tokens=tokens)
    check(model, lambda t, b: F.cross_entropy(model(t), b), tokens, y, reference, embedding=embedding, representation="embedding")


def test_tokens_without_a_split_leave_m1_absent_and_train_on():
    model = made(GruTokens)
    tokens, y = token_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.wrap(model, opt, lambda t, b: F.cross_entropy(model(t), b), settings={"estimate_every": 1, "background_estimates": False})
    before = [p.detach().clone() for p in model.parameters()]
    release = guard.train_step(tokens, y)
    assert release.released
    assert all(l["sensitivity"]["status"] == "absent" for l in release.report["layers"])
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
