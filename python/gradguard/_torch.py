"""The PyTorch front end: ``gradguard.wrap(model, optimizer, loss_fn, ...)`` guards a user's own
training loop with the engine's one step (the same Rust ``Guard`` the tch loop and the Flower
client call).

The guard's layers are the model's ``named_parameters()`` grouped by module path (``conv1.weight``
and ``conv1.bias`` form layer ``conv1``, as for a TorchScript model), its ``named_buffers()`` are
restored bit for bit after the guard's own passes, and those passes leave libtorch's random
stream where it was (one generator in the process: the extension links torch's libtorch), so a
guarded run without rules ends bit-identical to the unguarded one, with dropout too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Optional, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import _native
from ._native import InputError, PolicyError


@dataclass(frozen=True)
class Release:
    """What the guard decided on one step.

    ``released``: ``p.grad`` holds the protected gradient (the optimizer stepped, for
    ``step``/``train_step``). ``held``: the batch was held back for the aggregation floor
    (``p.grad`` zeroed, no step). ``blocked``: refused, ``reason`` says why (``p.grad`` zeroed,
    no step). ``report``: the step's report (a dict, the report JSON of the Rust engine, made on
    first use: most steps' reports are never read). ``update``: for ``Guard.release`` only, the
    protected tensors of the released layers.
    """

    kind: str
    reason: Optional[str]
    native_report: Any = field(repr=False)
    update: dict = field(default_factory=dict)

    @cached_property
    def report(self) -> dict:
        """The step's report (the report JSON of the Rust engine, parsed once)."""
        return json.loads(self.native_report.json())

    @property
    def released(self) -> bool:
        return self.kind == "released"

    @property
    def blocked(self) -> bool:
        return self.kind == "blocked"

    @property
    def held(self) -> bool:
        return self.kind == "held"

    @property
    def estimated(self) -> bool:
        """Whether the leakage was estimated on this step (M1 and the rest in ``report``)."""
        return self.native_report.estimated

    @property
    def estimate_seconds(self) -> Optional[float]:
        """Wall time of this step's estimate, None when none ran."""
        return self.native_report.estimate_seconds


@dataclass(frozen=True)
class Vetting:
    """The vetting of parameters set from outside (``Guard.vet``): ``accepted`` or refused with
    ``reason``; ``report``: per layer the sample isolation (M6) and the analytic attacks' results
    (a dict, the vetting JSON of the Rust engine)."""

    reason: Optional[str]
    report: dict

    @property
    def accepted(self) -> bool:
        return self.reason is None


def _release(decided) -> Release:
    """The Release; an InputError (carrying it as ``.release``) when it was blocked for
    non-finite gradients: a NaN or infinite loss is a bug of the loop, not a decision to go on
    from. The block was decided (audit log, metrics) before the exception."""
    kind, reason, non_finite, report, update = decided
    release = Release(kind, reason, report, dict(update))
    if non_finite:
        err = InputError(f"the gradient is not finite (a NaN or infinite loss or input?): {reason}; the release was blocked, p.grad zeroed, the optimizer not stepped")
        err.release = release
        raise err
    return release


def _twice_differentiable(f: Callable) -> Callable:
    """``f`` run with PyTorch's math attention: M1 differentiates the gradient again, and the fused
    scaled-dot-product kernels (flash, memory-efficient) have no second derivative
    (``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented``). The math kernel computes the same function; it is used for every call the
    guard makes, so ``train_step``'s training forward runs on it too."""

    def call(*args):
        with sdpa_kernel(SDPBackend.MATH):
            return f(*args)

    return call


def _is_batch_norm(m: torch.nn.Module) -> bool:
    return isinstance(m, torch.nn.modules.batchnorm._BatchNorm)


class Guard:
    """A guarded training loop over one model and its optimizer (built by ``gradguard.wrap``)."""

    def __init__(self, model, optimizer, native, split: bool):
        self.model = model
        self.optimizer = optimizer
        self._native = native
        self._split = split
        first = next(p for p in model.parameters() if p.requires_grad)
        self._device = first.device
        self._dtype = first.dtype

    # -- checks that fail before anything runs: the model is left as it was ---------------------
    def _check(self, x, y, attribute, sample_ids):
        for what, t in (("inputs", x), ("targets", y), ("attribute", attribute), ("sample_ids", sample_ids)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise InputError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
            if t.device != self._device:
                raise InputError(f"{what} are on {t.device}, the model's parameters on {self._device}: move the batch to the model's device")
        # Integer inputs without a split are not an error: M1 is then absent, as in Rust.
        if x.is_floating_point() and x.dtype != self._dtype:
            raise InputError(f"inputs are {x.dtype}, the model's parameters {self._dtype}: convert one to the other")

    def _clear_grads(self):
        # Fail closed: nothing unchecked is left for an optimizer stepped by the caller anyway.
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.zero_()

    def _checked(self, x, y, attribute, sample_ids):
        try:
            self._check(x, y, attribute, sample_ids)
        except InputError:
            self._clear_grads()
            raise

    def step(self, x, y, attribute=None, sample_ids=None) -> Release:
        """After ``loss.backward()``: measure when due, protect ``p.grad`` in place and call
        ``optimizer.step()`` when the release is released. ``attribute``: per-sample private
        labels (integers) for M2/M3; ``sample_ids``: each sample's id in the data set (the run
        ledger). A held or blocked release leaves ``p.grad`` zeroed and does not step."""
        self._checked(x, y, attribute, sample_ids)
        return _release(self._native.step(x, y, attribute, sample_ids))

    def train_step(self, x, y, attribute=None, sample_ids=None) -> Release:
        """The fast path: ``optimizer.zero_grad()``, one forward and backward of ``loss_fn`` that
        also serves the estimate on a step that estimates, then as ``step``."""
        self._checked(x, y, attribute, sample_ids)
        return _release(self._native.train_step(x, y, attribute, sample_ids))

    def release(self, update: dict, x, y, attribute=None, sample_ids=None) -> Release:
        """The explicit form (a federated client's update, named as ``named_parameters()``):
        decide what may leave; ``update`` is not edited, ``Release.update`` holds the protected
        tensors of the released layers. The optimizer is not touched."""
        self._check(x, y, attribute, sample_ids)
        items = [(name, t) for name, t in update.items()]
        return _release(self._native.release(items, x, y, attribute, sample_ids))

    def estimate(self, x, y, attribute=None) -> dict:
        """Estimates now on a batch, without reading ``p.grad``, deciding or stepping: the
        report (a dict). Buffers and the random stream are left as they were."""
        self._check(x, y, attribute, None)
        return json.loads(self._native.estimate(x, y, attribute))

    def vet(self, x, y) -> Vetting:
        """Vets the parameters as they are now, on a batch the caller would train on, before
        training on them: what a federated client calls on the round's global model, which a
        malicious server may have chosen so that its units each carry one sample of the next
        batch (trap weights). Refused when a parameter is not finite, a sample isolation rule
        of the policy fails, or the analytic attacks recover more than the policy's
        ``vetting.max_recovered_fraction``; the refusal is logged. Nothing is trained or
        stepped; buffers and the random stream are left as they were."""
        self._check(x, y, None, None)
        reason, vetting = self._native.vet(x, y)
        return Vetting(reason, json.loads(vetting))

    @property
    def state_origin(self) -> str:
        """Where the guard went on from when it was built: ``fresh``, ``restored (step N)``
        (``state=``), ``restored from <log>.state.json (step N)`` (a restart), or fresh for a
        state of another policy (saying so)."""
        return self._native.state_origin()

    def save_state(self) -> Optional[str]:
        """Saves the state beside the audit log (``<audit_log>.state.json``, its SHA-256 in the
        log): a guard built later on the same log goes on from it, checked against the log.
        Returns the hash; None without an audit log."""
        return self._native.save_state()

    def close(self) -> None:
        """Ends the audit log with a checkpoint and a ``closed`` record (the next writer of the
        log continues a verified chain). Dropping the guard does the same."""
        self._native.close()

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def layer_names(self) -> list:
        """The layers as the guard names them (module paths), in module order."""
        return self._native.layer_names()

    @property
    def policy_hash(self) -> str:
        return self._native.policy_hash()

    @property
    def settings(self) -> dict:
        """The settings in force (the policy's, with ``settings=`` laid over them)."""
        return json.loads(self._native.settings())

    @property
    def metrics_address(self) -> Optional[str]:
        """``host:port`` of the Prometheus endpoint (``metrics=``; port 0 picks a free one)."""
        return self._native.metrics_address()

    @property
    def steps(self) -> int:
        """Steps decided so far."""
        return self._native.steps()

    def state(self) -> dict:
        """The guard's state (protection levels, step count, run ledger)."""
        return json.loads(self._native.state())

    def restore_state(self, state: dict) -> None:
        """Goes on from ``state()`` saved earlier (another process, a federated round): the
        levels, the step count and the ledger. ``StateError`` for a state of another policy or
        other layers; nothing changes then."""
        self._native.restore_state(json.dumps(state))

    def table(self, release: Release) -> str:
        """The per-layer table of a release's report, with this guard's thresholds."""
        return self._native.table(release.native_report)


def _policy_text(policy) -> Optional[tuple]:
    if policy is None:
        return None
    if not isinstance(policy, (str, os.PathLike)):
        raise PolicyError(f"policy must be the path of a policy file (TOML), got {type(policy).__name__}")
    path = os.fspath(policy)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    except OSError as e:
        raise PolicyError(f"policy {path}: {e.strerror or e}") from None


def wrap(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    policy=None,
    settings: Optional[dict] = None,
    metrics: Optional[str] = None,
    audit_log=None,
    embedding: Optional[Sequence[Callable]] = None,
    state: Optional[dict] = None,
    noise_key: Optional[int] = None,
) -> Guard:
    """Guards a PyTorch training loop.

    - ``loss_fn(inputs, targets)``: the batch-mean loss; it runs ``model`` (the guard calls it
      for its own passes, in the mode the model is in).
    - ``policy``: a policy file (TOML); without one the guard measures and releases what is
      finite. ``settings``: keys of the policy's ``[settings]`` table laid over it.
    - ``metrics``: ``"host:port"`` of a Prometheus endpoint for the guard's series.
    - ``audit_log``: the hash-chained JSON-lines log of every change of state. When a state
      was saved beside it (``Guard.save_state``), the guard goes on from that state, checked
      against the log (a ``restarted`` record); one that cannot be vouched for (missing after a
      logged save, rolled back, unreadable) is a ``StateError`` until an operator runs
      ``gradguard log reset-state``.
    - ``state``: a state kept by the caller (``Guard.state()``, e.g. in Flower's
      ``Context.state``) to go on from; the one saved beside the audit log wins.
    - ``embedding``: ``(embed_fn, loss_from_embeddings_fn)`` for a model on token ids, with
      ``loss_from_embeddings_fn(embed_fn(tokens), y) == loss_fn(tokens, y)``: M1 is measured on
      the embeddings.
    - ``noise_key``: for tests and audits only; replaces the secret key of the noise seeds
      (whoever knows it can subtract the noise).
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise InputError("loss_fn must be callable: loss_fn(inputs, targets) -> the batch-mean loss")
    if embedding is not None:
        if len(embedding) != 2 or not all(callable(f) for f in embedding):
            raise InputError("embedding must be (embed_fn, loss_from_embeddings_fn)")
        embedding = tuple(_twice_differentiable(f) for f in embedding)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters")
    devices = {p.device for _, p in params}
    if len(devices) > 1:
        raise InputError(f"the model's parameters are on several devices ({sorted(map(str, devices))}): the guard needs one")
    buffers = [(n, b) for n, b in model.named_buffers()]
    # Batch norm in training mode mixes the samples of a batch: M1's probes keep the whole batch.
    coupled = any(_is_batch_norm(m) and m.training for m in model.modules())
    if settings is not None and not isinstance(settings, dict):
        raise PolicyError(f"settings must be a dict of the policy's [settings] keys, got {type(settings).__name__}")
    native = _native.TorchGuard(
        params,
        buffers,
        coupled,
        optimizer,
        _twice_differentiable(loss_fn),
        embedding,
        _policy_text(policy),
        None if settings is None else json.dumps(settings),
        metrics,
        None if audit_log is None else os.fspath(audit_log),
        None if state is None else json.dumps(state),
        noise_key,
    )
    return Guard(model, optimizer, native, embedding is not None)
