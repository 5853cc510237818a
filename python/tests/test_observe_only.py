"""Observe-only: 20 guarded steps with an estimate at every step end bit-identical (parameters and
buffers) to the same 20 steps unguarded, with batch norm in training mode and with dropout: the
guard restores the buffers after its own passes and leaves libtorch's random stream (the one
torch draws dropout masks from: one libtorch in the process) where it found it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import gradguard
from models import BatchNormCnn, TransformerClassifier, cnn_batch, made, seq_batch

STEPS = 20
EVERY_STEP = {"estimate_every": 1, "budget_share": 1.0, "background_estimates": False, "probes": 2}


def batches(make):
    return [make(n=6, dtype=torch.float32, seed=100 + k) for k in range(STEPS)]


def run(cls, make, mode, math_attention=False):
    """`mode`: None (unguarded), "step" (the user's backward, then guard.step) or "train_step"."""
    model = made(cls, dtype=torch.float32)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = lambda x, y: F.cross_entropy(model(x), y)
    guard = None if mode is None else gradguard.wrap(model, opt, loss_fn, settings=EVERY_STEP)
    torch.manual_seed(1234)  # the dropout stream of the run
    for x, y in batches(make):
        if mode == "train_step":
            release = guard.train_step(x, y)
        else:
            opt.zero_grad()
            if math_attention:
                with sdpa_kernel(SDPBackend.MATH):
                    loss_fn(x, y).backward()
            else:
                loss_fn(x, y).backward()
            if mode is None:
                opt.step()
                continue
            release = guard.step(x, y)
        assert release.released, release.reason
        assert release.estimated
        assert all(l["sensitivity"]["status"] == "measured" for l in release.report["layers"])
    after = torch.rand(4)  # where the random stream stands after the run
    return model, after


def assert_same(a, b):
    (ma, ra), (mb, rb) = a, b
    for (n, p), (_, q) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(p, q), n
    buffers = list(ma.named_buffers())
    for (n, p), (_, q) in zip(buffers, mb.named_buffers()):
        assert torch.equal(p, q), n
    assert torch.equal(ra, rb)
    return buffers


@pytest.mark.parametrize("mode", ["step", "train_step"])
def test_batch_norm_cnn(mode):
    unguarded = run(BatchNormCnn, cnn_batch, None)
    buffers = assert_same(run(BatchNormCnn, cnn_batch, mode), unguarded)
    # The comparison covered the running statistics, and they moved.
    assert {n for n, _ in buffers} >= {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"}
    assert int(dict(buffers)["bn1.num_batches_tracked"]) == STEPS


def test_transformer_with_dropout_step():
    assert_same(run(TransformerClassifier, seq_batch, "step"), run(TransformerClassifier, seq_batch, None))


def test_transformer_with_dropout_train_step():
    # train_step's forward is one of the guard's calls, which run on the math attention kernel
    # (gradguard/_torch.py): the unguarded run uses it too.
    assert_same(run(TransformerClassifier, seq_batch, "train_step"), run(TransformerClassifier, seq_batch, None, math_attention=True))


def test_dropout_draws_are_real():
    # The test would prove nothing if dropout drew nothing: two streams give two models.
    a = run(TransformerClassifier, seq_batch, None)
    torch.manual_seed(0)
    model = made(TransformerClassifier, dtype=torch.float32)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(999)
    for x, y in batches(seq_batch):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert any(not torch.equal(p, q) for p, q in zip(a[0].parameters(), model.parameters()))
