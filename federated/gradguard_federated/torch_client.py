"""The ClientApp's handlers for the user's own PyTorch model (run config `torch-model`): the
client trains the `nn.Module` with torch on its own data (node config `data-dir`), then releases
the round's mean gradient only as its policy allows, through `gradguard.wrap(...).release`
(the engine's explicit release, as the tch-side client's `Guard::release`). The reply has the
layout of client_app.py's, so the server verifies and aggregates it as any other.

What is released: `(w_global - w_local) / (lr * local_steps)` per parameter after plain SGD, the
mean of the local mini-batch gradients (docs/FEDERATED.md). The guard measures it on the round's
samples at the global parameters (what the server knows), with the attribute for M2, and goes on
across rounds from the state kept in `Context.state`.
"""

from __future__ import annotations

import copy
import json

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from .task import ARRAYS_KEY, GUARD_KEY, METRICS_KEY, STATE_KEY, to_record
from .torch_task import load_model, load_parameters, node_data, parameters


def local_training(model, x, y, lr: float, steps: int, batch_size: int, seed: int):
    """Plain SGD, `steps` mini-batches of `batch_size` drawn with a seeded generator; the samples
    used (indices) and the mean training loss."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    used, total = [], 0.0
    for _ in range(steps):
        idx = torch.randint(0, len(y), (min(batch_size, len(y)),), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        used.append(idx)
        total += float(loss)
    return torch.unique(torch.cat(used)), total / steps


def train(msg: Message, context: Context, settings, params: dict, config: dict) -> Message:
    """The guarded local round on the node's own data with the run's PyTorch model."""
    import torch
    import torch.nn.functional as F

    import gradguard

    spec = str(context.run_config["torch-model"])
    if settings.data_dir is None:
        raise gradguard.ConfigError("torch-model needs the node's own data (node config data-dir: x.npy, y.npy)")
    (x, y, a), _ = node_data(settings.data_dir, settings.test_fraction, settings.data_seed)
    lr, steps = float(config.get("lr", 0.1)), int(config.get("local-steps", 1))
    batch_size, seed = int(config.get("batch-size", 32)), int(config.get("seed", 0))
    server_round = int(config.get("server-round", 0))

    global_model = load_model(spec)
    load_parameters(global_model, params)
    local = copy.deepcopy(global_model)
    used, train_loss = local_training(local, x, y, lr, steps, batch_size, seed + 1000 * server_round + settings.partition_id)
    with torch.no_grad():
        update = {n: (p_g - p_l) / (lr * steps) for (n, p_g), (_, p_l) in zip(global_model.named_parameters(), local.named_parameters())}

    # The guard over the global model: what the server knows; it measures on the round's samples.
    global_model.train()
    guard = gradguard.wrap(
        global_model,
        torch.optim.SGD(global_model.parameters(), lr=0.0),  # never stepped: the explicit form
        lambda inputs, targets: F.cross_entropy(global_model(inputs), targets),
        policy=settings.policy_path,
        audit_log=None if settings.audit_log is None else str(settings.audit_log),
    )
    saved = context.state.config_records.get(STATE_KEY)
    if saved is not None:
        guard.restore_state(json.loads(str(saved["state"])))
    release = guard.release(update, x[used], y[used], attribute=None if a is None else a[used])
    context.state.config_records[STATE_KEY] = ConfigRecord({"state": json.dumps(guard.state()), "round": server_round})

    manifest = release.report["release"]
    released = [l["name"] for l in manifest["layers"] if l["released"]]
    withheld = [l["name"] for l in manifest["layers"] if not l["released"]]
    gradguard_record = {
        "status": "blocked" if release.blocked else "released",
        "kind": "blocked" if release.blocked else gradguard.fl.release_kind(json.dumps(manifest)),
        "manifest": json.dumps(manifest),
        "policy-hash": guard.policy_hash,
        "partition-id": settings.partition_id,
        "step": int(manifest["step"]),
        "state-origin": "context" if saved is not None else "fresh",
    }
    metrics = {
        "num-examples": int(len(used)),
        "blocked": int(release.blocked),
        "train-loss": float(train_loss),
        "local-steps": steps,
        "lr": lr,
        "partition-id": settings.partition_id,
        "released-layers": len(released),
        "withheld-layers": len(withheld),
    }
    if release.blocked:
        gradguard_record["reason"] = release.reason
        return Message(RecordDict({METRICS_KEY: MetricRecord(metrics), GUARD_KEY: ConfigRecord(gradguard_record)}), reply_to=msg)
    gradguard_record["report"] = gradguard.fl.shared_report(json.dumps(release.report), released)
    arrays = {n: t.detach().cpu().numpy() for n, t in release.update.items()}
    content = RecordDict({ARRAYS_KEY: to_record(arrays), METRICS_KEY: MetricRecord(metrics), GUARD_KEY: ConfigRecord(gradguard_record)})
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context, settings, params: dict) -> Message:
    """Accuracy and loss of the global model on the node's held-out data."""
    import torch
    import torch.nn.functional as F

    model = load_model(str(context.run_config["torch-model"]))
    load_parameters(model, params)
    _, (xt, yt) = node_data(settings.data_dir, settings.test_fraction, settings.data_seed)
    model.eval()
    with torch.no_grad():
        out = model(xt)
        values = {
            "loss": float(F.cross_entropy(out, yt)),
            "accuracy": float((out.argmax(1) == yt).float().mean()),
            "num-examples": int(len(yt)),
            "partition-id": settings.partition_id,
        }
    return Message(RecordDict({METRICS_KEY: MetricRecord(values)}), reply_to=msg)
