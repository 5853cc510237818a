"""The user's own PyTorch model in the federated app (run config `torch-model`): an importable
factory `package.module:function` that returns an `nn.Module` on inputs of float32 features
(class-id targets, cross-entropy), built on every node and on the server. The server starts
from its seeded parameters and checks policies against its layers; a client trains it with
torch and releases through `gradguard.wrap`'s explicit release (torch_client.py).

Only parameters travel (named as `named_parameters()`); buffers such as batch norm's running
statistics stay on the node, rebuilt from the factory each round.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from .task import NodeConfigError


def load_model(spec: str, seed: int = 0):
    """`spec`'s model, its parameters initialised under `seed`."""
    import torch

    module_name, _, attr = str(spec).partition(":")
    if not module_name or not attr:
        raise NodeConfigError(f"torch-model must be 'package.module:function', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise NodeConfigError(f"torch-model {spec!r}: {type(error).__name__}: {error}") from None
    torch.manual_seed(seed)
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise NodeConfigError(f"torch-model {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def parameters(model) -> dict[str, np.ndarray]:
    return {n: p.detach().cpu().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}


def load_parameters(model, params: dict[str, np.ndarray]) -> None:
    """Sets the model's parameters to `params` (exactly its trainable parameters, same shapes)."""
    import torch

    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(own) != set(params):
        raise ValueError(f"the global parameters {sorted(params)} are not the model's {sorted(own)}")
    with torch.no_grad():
        for name, p in own.items():
            value = torch.from_numpy(np.asarray(params[name])).to(p.dtype)
            if value.shape != p.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)}, the model's {tuple(p.shape)}")
            p.copy_(value)


def node_data(folder: Path, test_fraction: float, seed: int):
    """A node's .npy folder as tensors: (x, y, attribute or None) for training and (x, y) held out
    (x_test.npy / y_test.npy when present, else a seeded fraction of x.npy)."""
    import torch

    def load(name):
        path = Path(folder) / name
        return np.load(path) if path.is_file() else None

    x, y, a = load("x.npy"), load("y.npy"), load("attribute.npy")
    if x is None or y is None:
        raise NodeConfigError(f"data-dir {folder}: x.npy and y.npy are required")
    if len(x) != len(y) or (a is not None and len(a) != len(y)):
        raise NodeConfigError(f"data-dir {folder}: x.npy, y.npy (and attribute.npy) must have as many rows")
    xt, yt = load("x_test.npy"), load("y_test.npy")
    if xt is None or yt is None:
        order = np.random.default_rng(seed).permutation(len(y))
        cut = int(round(len(y) * (1.0 - test_fraction)))
        train, held = order[:cut], order[cut:]
        xt, yt = x[held], y[held]
        x, y, a = x[train], y[train], None if a is None else a[train]
    tensor = lambda v, kind: torch.from_numpy(np.ascontiguousarray(v)).to(kind)
    attribute = None if a is None else tensor(a, torch.int64)
    return (tensor(x, torch.float32), tensor(y, torch.int64), attribute), (tensor(xt, torch.float32), tensor(yt, torch.int64))


def policy_hash(spec: str, policy_path: str) -> str:
    """The hash of `policy_path` as a guard over `spec`'s model enforces it (a PolicyError when
    it does not fit the model: a layer pattern that matches nothing, say)."""
    import torch
    import gradguard

    model = load_model(spec)
    guard = gradguard.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), lambda x, y: model(x).sum(), policy=policy_path)
    return guard.policy_hash
